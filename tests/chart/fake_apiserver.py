"""A minimal Kubernetes API server, just enough for `helm template --dry-run=server`.

No kube-apiserver can run here, yet the token Secret's `lookup` only runs
against a cluster. helm asks for /version and API discovery (to map the
chart's kinds to resources), then GETs the objects the templates look up.
This server answers discovery for the kinds the chart renders and serves
the Secrets a test stores; everything else is 404 like a real empty cluster.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# group/version -> [(kind, plural, namespaced)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("Secret", "secrets", True),
        ("Service", "services", True),
        ("ServiceAccount", "serviceaccounts", True),
        ("PersistentVolumeClaim", "persistentvolumeclaims", True),
        ("ConfigMap", "configmaps", True),
    ],
    "apps/v1": [("Deployment", "deployments", True), ("DaemonSet", "daemonsets", True)],
    "rbac.authorization.k8s.io/v1": [
        ("ClusterRole", "clusterroles", False),
        ("ClusterRoleBinding", "clusterrolebindings", False),
        ("Role", "roles", True),
        ("RoleBinding", "rolebindings", True),
    ],
    "storage.k8s.io/v1": [
        ("StorageClass", "storageclasses", False),
        ("CSIDriver", "csidrivers", False),
    ],
    "policy/v1": [("PodDisruptionBudget", "poddisruptionbudgets", True)],
    "networking.k8s.io/v1": [("NetworkPolicy", "networkpolicies", True)],
    "snapshot.storage.k8s.io/v1": [("VolumeSnapshotClass", "volumesnapshotclasses", False)],
    "monitoring.coreos.com/v1": [("ServiceMonitor", "servicemonitors", True)],
}


def _resource_list(group_version: str) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": plural,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["get", "list", "create", "update", "patch", "delete"],
            }
            for kind, plural, namespaced in RESOURCES[group_version]
        ],
    }


def _groups() -> dict[str, Any]:
    groups = []
    for gv in RESOURCES:
        if "/" not in gv:
            continue
        name, version = gv.split("/")
        entry = {"groupVersion": gv, "version": version}
        groups.append({"name": name, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


class FakeCluster:
    """Secrets by (namespace, name), and the paths helm asked for."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        path = path.split("?", 1)[0].rstrip("/")
        self.requests.append(path)
        if path == "/version":
            return 200, {"major": "1", "minor": "35", "gitVersion": "v1.35.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, _groups()
        if path == "/api/v1":
            return 200, _resource_list("v1")
        if path.startswith("/apis/") and path.count("/") == 3:
            gv = path.removeprefix("/apis/")
            if gv in RESOURCES:
                return 200, _resource_list(gv)
        parts = path.split("/")
        # /api/v1/namespaces/NS/secrets/NAME
        if len(parts) == 7 and parts[1:3] == ["api", "v1"] and parts[5] == "secrets":
            secret = self.secrets.get((parts[4], parts[6]))
            if secret is not None:
                return 200, secret
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
        }


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = cluster.answer(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Quiet: the test reads cluster.requests instead."""

    return Handler


@contextmanager
def fake_cluster(directory: Path) -> Iterator[tuple[FakeCluster, Path]]:
    """Serve a FakeCluster on 127.0.0.1; yields it and a kubeconfig pointing at it."""
    cluster = FakeCluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cluster))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_port}"},
                    }
                ],
                "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "test"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        yield cluster, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
