"""The bearer token Secret: generated once, then the same across upgrades and reinstalls.

If an upgrade rolled the token, every node-agent and CSI plugin would lose
management at once. The chart looks the Secret up (`lookup`) and reuses its
token; this is exercised for real with `helm template --dry-run=server`
against a fake API server that holds (or does not hold) the Secret.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tests.chart.chart import CHART, NAMESPACE, RELEASE, Doc, Helm, one, write_values
from tests.chart.fake_apiserver import fake_cluster

SECRET = "tessera-token"
SERVER_SIDE = ["--dry-run=server", "--disable-openapi-validation"]


def installed_secret(token: bytes) -> Doc:
    """The Secret as an earlier `helm install` left it (helm's ownership marks included)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SECRET,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": NAMESPACE,
                "helm.sh/resource-policy": "keep",
            },
        },
        "type": "Opaque",
        "data": {"token": base64.b64encode(token).decode()},
    }


def token_of(docs: list[Doc]) -> bytes:
    return base64.b64decode(one(docs, "Secret", SECRET)["data"]["token"])


def test_token_secret_is_kept_by_helm_uninstall(rendered: dict[str, list[Doc]]) -> None:
    secret = one(rendered["default"], "Secret", SECRET)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert secret["metadata"]["namespace"] == NAMESPACE


def test_token_template_looks_up_the_secret_already_in_the_cluster() -> None:
    source = (CHART / "templates" / "token-secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in source


def test_upgrade_keeps_the_token_of_the_secret_in_the_cluster(
    helm: Helm, values_dir: Path, tmp_path: Path
) -> None:
    values = write_values(values_dir, {}, "upgrade")
    with fake_cluster(tmp_path) as (cluster, kubeconfig):
        cluster.secrets[(NAMESPACE, SECRET)] = installed_secret(b"token-from-first-install")
        env = {"KUBECONFIG": str(kubeconfig)}
        first = helm.template(values, SERVER_SIDE, env=env)
        second = helm.template(values, SERVER_SIDE, env=env)
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}" in cluster.requests
    assert token_of(first) == token_of(second) == b"token-from-first-install"


def test_first_install_generates_a_long_random_token(
    helm: Helm, values_dir: Path, tmp_path: Path
) -> None:
    values = write_values(values_dir, {}, "install")
    with fake_cluster(tmp_path) as (cluster, kubeconfig):
        env = {"KUBECONFIG": str(kubeconfig)}
        first = token_of(helm.template(values, SERVER_SIDE, env=env))
        again = token_of(helm.template(values, SERVER_SIDE, env=env))
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}" in cluster.requests
    assert len(first) == 48 and first.isalnum()
    # nothing stored yet: each render would make its own (only install applies one)
    assert first != again


def test_a_given_token_wins_over_the_stored_one(
    helm: Helm, values_dir: Path, tmp_path: Path
) -> None:
    values = write_values(values_dir, {"auth": {"token": "rotated-by-the-admin"}}, "rotate")
    with fake_cluster(tmp_path) as (cluster, kubeconfig):
        cluster.secrets[(NAMESPACE, SECRET)] = installed_secret(b"old")
        docs = helm.template(values, SERVER_SIDE, env={"KUBECONFIG": str(kubeconfig)})
    assert token_of(docs) == b"rotated-by-the-admin"
