"""The node's zone and region from its Kubernetes Node object (`tessera-csi --kubernetes-topology`).

NodeGetInfo reports `topology.kubernetes.io/zone` and `.../region` beside
Tessera's own node key, so StorageClasses can restrict volumes by zone the
way every other CSI driver does. They come from the labels of the Node
object named by --node-id (the chart passes spec.nodeName), read with the
`kubernetes` client: in-cluster config (the pod's service account, RBAC
`get nodes`), or $KUBECONFIG when it is set.

Decisions (docs/operations.md):
- Read lazily at the first NodeGetInfo (node-driver-registrar calls it at
  registration, right after start) and kept once read: a node's zone does
  not change under a running kubelet, and NodeGetInfo is the only caller.
- A node whose labels cannot be read never registers with a missing or
  wrong zone: NodeGetInfo fails (UNAVAILABLE when the API server did not
  answer, FAILED_PRECONDITION when it refused: no such Node, RBAC) and the
  next call tries again; the registrar retries until it works. Everything
  else keeps working meanwhile (Probe, stage, publish of existing volumes):
  an API server outage must not stop the data path of running pods.
- A Node without the labels (a single-zone kubeadm cluster) is not an
  error: NodeGetInfo reports what is true, the Tessera node key alone.
- No usable client configuration at all (neither in a pod nor $KUBECONFIG)
  is a start-up error: the flag asks for something that cannot work here.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from tessera.errors import FailedPrecondition, Unavailable
from tessera.topology import ZONE_KEY

REGION_KEY = "topology.kubernetes.io/region"
#: where the kubelet mounts a pod's service account token and the cluster's CA
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: the Node labels NodeGetInfo passes on
LABELS = (ZONE_KEY, REGION_KEY)
#: seconds to connect and to read: NodeGetInfo answers (or fails) promptly, the registrar retries
TIMEOUT = (3.0, 5.0)

log = logging.getLogger(__name__)


class KubernetesConfigError(RuntimeError):
    """--kubernetes-topology without a way to reach the API server (tessera-csi exits 1)."""


class NodeTopology:
    """The zone and region labels of one Node object, read once and then kept."""

    def __init__(
        self,
        node_name: str,
        kubeconfig: str | None = None,
        service_account: Path = SERVICE_ACCOUNT,
    ) -> None:
        self.node_name = node_name
        kubeconfig = kubeconfig if kubeconfig is not None else _kubeconfig_env()
        self._api = _core_api(kubeconfig, service_account)
        self._lock = threading.Lock()
        self._segments: dict[str, str] | None = None

    def segments(self) -> dict[str, str]:
        """The topology segments from the Node's labels; raises until they could be read."""
        with self._lock:
            if self._segments is None:
                labels = self._read_labels()
                self._segments = {key: labels[key] for key in LABELS if labels.get(key)}
                log.info(
                    "node %s: topology from its Kubernetes Node labels: %s",
                    self.node_name,
                    self._segments or "none (the Node has no zone or region label)",
                )
            return dict(self._segments)

    def _read_labels(self) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            node = self._api.read_node(self.node_name, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if not exc.status:  # the client's own wrapping of a TLS failure: no answer at all
                reason = str(exc.reason or "").split("\n", 1)[0]
                raise Unavailable(
                    f"cannot read the Kubernetes Node {self.node_name!r} for its zone and "
                    f"region: no answer from the API server ({reason}); retrying"
                ) from None
            raise _refusal(self.node_name, exc.status) from None
        except (HTTPError, OSError) as exc:
            raise Unavailable(
                f"cannot read the Kubernetes Node {self.node_name!r} for its zone and region: "
                f"the API server did not answer ({type(exc).__name__}); retrying"
            ) from None
        return dict(node.metadata.labels or {})


def _refusal(node_name: str, status: int | None) -> FailedPrecondition | Unavailable:
    if status == 404:
        return FailedPrecondition(
            f"Kubernetes has no Node named {node_name!r}: --node-id must be the Kubernetes "
            "node name (the pod's spec.nodeName)",
            field="node_id",
        )
    if status in (401, 403):
        return FailedPrecondition(
            f"the API server refused to show Node {node_name!r} (HTTP {status}): the plugin's "
            "service account needs RBAC `get` on `nodes` for --kubernetes-topology"
        )
    return Unavailable(
        f"the API server answered HTTP {status} for Node {node_name!r}; retrying later"
    )


def _kubeconfig_env() -> str:
    return os.environ.get("KUBECONFIG", "")


def _core_api(kubeconfig: str, service_account: Path) -> Any:
    """A CoreV1Api from $KUBECONFIG when set, else from the pod's service account.

    In a pod: $KUBERNETES_SERVICE_HOST/PORT, and the token and CA the
    kubelet mounts in `service_account` (the token is re-read as the
    kubelet rotates it).
    """
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = client.Configuration()
    try:
        if kubeconfig:
            # only the first file of a KUBECONFIG list: the client reads one file
            path = kubeconfig.split(os.pathsep)[0]
            config.load_kube_config(
                config_file=path, client_configuration=configuration, persist_config=False
            )
        else:
            InClusterConfigLoader(
                token_filename=str(service_account / "token"),
                cert_filename=str(service_account / "ca.crt"),
            ).load_and_set(configuration)
    except (config.ConfigException, OSError, ValueError) as exc:
        where = f"$KUBECONFIG {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise KubernetesConfigError(
            f"--kubernetes-topology: cannot load a Kubernetes client configuration from "
            f"{where}: {exc} (run in a pod with a service account, or set $KUBECONFIG)"
        ) from None
    # One try per call: NodeGetInfo answers now and the registrar retries, instead of
    # urllib3's own three retries with backoff holding the RPC.
    configuration.retries = False
    return client.CoreV1Api(client.ApiClient(configuration))
