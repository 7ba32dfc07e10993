"""helm lint and helm template of every variant, validated against Kubernetes 1.35."""

from __future__ import annotations

import base64
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    NAMESPACE,
    Doc,
    Helm,
    container,
    find,
    one,
    validate,
    write_values,
)
from tests.chart.variants import MICROK8S_KUBELET, VARIANTS

MGMT_URL = f"--management=http://tessera-management.{NAMESPACE}.svc:8080"


def strings(node: object) -> list[str]:
    """Every string anywhere in rendered objects."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict_accepts_the_variant(helm: Helm, values_dir: Path, variant: str) -> None:
    out = helm.lint(write_values(values_dir, VARIANTS[variant], f"lint-{variant}"))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid_for_kubernetes_1_35(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    docs = rendered[variant]
    assert docs
    for doc in docs:
        validate(doc)


def test_default_install_makes_the_whole_driver(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for wanted in [
        ("Deployment", "tessera-controller"),
        ("DaemonSet", "tessera-node"),
        ("Deployment", "tessera-management"),
        ("Service", "tessera-management"),
        ("Secret", "tessera-token"),
        ("CSIDriver", "csi.tessera.io"),
        ("StorageClass", "tessera"),
        ("PodDisruptionBudget", "tessera-controller"),
        ("PersistentVolumeClaim", "tessera-management-db"),
        ("VolumeSnapshotClass", "tessera"),  # snapshots are on by default
    ]:
        assert wanted in kinds, f"default install lacks {wanted}"
    assert not find(docs, "NetworkPolicy")
    assert not find(docs, "ServiceMonitor")


def test_csidriver_asks_for_attach_pod_info_and_capacity(rendered: dict[str, list[Doc]]) -> None:
    spec = one(rendered["default"], "CSIDriver", "csi.tessera.io")["spec"]
    assert spec == {
        "attachRequired": True,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
        "storageCapacity": True,
    }
    off = one(rendered["single-controller-no-capacity"], "CSIDriver", "csi.tessera.io")
    assert off["spec"]["storageCapacity"] is False


def test_provisioner_runs_with_topology_metadata_ext4_and_capacity(
    rendered: dict[str, list[Doc]],
) -> None:
    ctrl = one(rendered["default"], "Deployment", "tessera-controller")
    prov = container(ctrl, "csi-provisioner")
    for flag in [
        "--feature-gates=Topology=true",
        "--extra-create-metadata",
        "--default-fstype=ext4",
        "--leader-election",
        "--enable-capacity",
        "--capacity-ownerref-level=2",
    ]:
        assert flag in prov["args"], flag
    assert {e["name"] for e in prov["env"]} >= {"NAMESPACE", "POD_NAME"}
    assert ctrl["spec"]["replicas"] == 2

    plain = one(rendered["single-controller-no-capacity"], "Deployment", "tessera-controller")
    assert plain["spec"]["replicas"] == 1
    assert not [a for a in container(plain, "csi-provisioner")["args"] if "capacity" in a]


def test_every_controller_sidecar_elects_a_leader(rendered: dict[str, list[Doc]]) -> None:
    ctrl = one(rendered["snapshots-on"], "Deployment", "tessera-controller")
    for name in ["csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"]:
        assert "--leader-election" in container(ctrl, name)["args"], name


def test_controller_plugin_reaches_management_with_the_contract_flags(
    rendered: dict[str, list[Doc]],
) -> None:
    ctrl = one(rendered["default"], "Deployment", "tessera-controller")
    args = container(ctrl, "tessera-csi")["args"]
    assert args[:2] == ["tessera-csi", "--mode=controller"]
    assert MGMT_URL in args
    assert "--metrics-listen=0.0.0.0:9810" in args
    assert "--token-file=/etc/tessera/token/token" in args
    assert "--http-endpoint=:9808" in container(ctrl, "liveness-probe")["args"]


def test_snapshotter_and_snapshot_class_only_when_snapshots_are_enabled(
    rendered: dict[str, list[Doc]],
) -> None:
    off = one(rendered["snapshots-off"], "Deployment", "tessera-controller")
    names = [c["name"] for c in off["spec"]["template"]["spec"]["containers"]]
    assert "csi-snapshotter" not in names
    assert not find(rendered["snapshots-off"], "VolumeSnapshotClass")
    # on by default: the driver advertises CREATE_DELETE_SNAPSHOT
    default = one(rendered["default"], "Deployment", "tessera-controller")
    default_names = [c["name"] for c in default["spec"]["template"]["spec"]["containers"]]
    assert "csi-snapshotter" in default_names
    on_docs = rendered["snapshots-on"]
    on = one(on_docs, "Deployment", "tessera-controller")
    assert "--extra-create-metadata" in container(on, "csi-snapshotter")["args"]
    vsc = one(on_docs, "VolumeSnapshotClass", "tessera")
    assert vsc["driver"] == "csi.tessera.io"
    assert vsc["deletionPolicy"] == "Delete"


def test_node_pod_runs_plugin_and_agent_with_the_contract_flags(
    rendered: dict[str, list[Doc]],
) -> None:
    ds = one(rendered["default"], "DaemonSet", "tessera-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    plugin = container(ds, "tessera-csi")["args"]
    assert plugin[:2] == ["tessera-csi", "--mode=node"]
    for flag in [
        "--kubernetes-topology",
        "--node-id=$(NODE_NAME)",
        "--metrics-listen=0.0.0.0:9811",
    ]:
        assert flag in plugin, flag
    agent = container(ds, "node-agent")["args"]
    assert agent[0] == "tessera-node-agent"
    for flag in [
        "--node-id=$(NODE_NAME)",
        MGMT_URL,
        "--socket=/run/tessera/agent.sock",
        "--listen=0.0.0.0:9700",
        "--advertise=$(NODE_IP)",
        "--export-address=$(NODE_IP)",
        "--state-dir=/var/lib/tessera/node-agent",
        "--dev-dir=/dev/tessera",
        "--file-pool=file=/var/lib/tessera/file-pools/file.img:20G",
    ]:
        assert flag in agent, flag
    assert "--http-endpoint=:9809" in container(ds, "liveness-probe")["args"]


def test_node_pods_are_replaced_only_on_delete_by_default(rendered: dict[str, list[Doc]]) -> None:
    ds = one(rendered["default"], "DaemonSet", "tessera-node")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    rolling = one(rendered["single-controller-no-capacity"], "DaemonSet", "tessera-node")
    assert rolling["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_custom_kubelet_dir_moves_every_kubelet_path(rendered: dict[str, list[Doc]]) -> None:
    ds = one(rendered["microk8s-kubelet-dir"], "DaemonSet", "tessera-node")
    spec = ds["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths["socket-dir"] == f"{MICROK8S_KUBELET}/plugins/csi.tessera.io"
    assert host_paths["registration-dir"] == f"{MICROK8S_KUBELET}/plugins_registry"
    assert host_paths["pods-dir"] == f"{MICROK8S_KUBELET}/pods"
    assert host_paths["plugins-dir"] == f"{MICROK8S_KUBELET}/plugins"
    registrar = container(ds, "node-driver-registrar")["args"]
    assert (
        f"--kubelet-registration-path={MICROK8S_KUBELET}/plugins/csi.tessera.io/csi.sock"
        in registrar
    )
    mounts = {m["mountPath"] for m in container(ds, "tessera-csi")["volumeMounts"]}
    assert {f"{MICROK8S_KUBELET}/pods", f"{MICROK8S_KUBELET}/plugins"} <= mounts
    leftovers = [s for s in strings(rendered["microk8s-kubelet-dir"]) if "=/var/lib/kubelet" in s]
    leftovers += [
        s for s in strings(rendered["microk8s-kubelet-dir"]) if s.startswith("/var/lib/kubelet")
    ]
    assert leftovers == []


def test_nvme_pools_become_agent_pools_on_existing_host_dirs(
    rendered: dict[str, list[Doc]],
) -> None:
    ds = one(rendered["nvme-pools"], "DaemonSet", "tessera-node")
    agent = container(ds, "node-agent")
    assert "--pool=nvme0=/mnt/nvme0/tessera" in agent["args"]
    assert "--pool=nvme1=/mnt/nvme1/tessera" in agent["args"]
    assert not [a for a in agent["args"] if a.startswith("--file-pool")]
    volumes = ds["spec"]["template"]["spec"]["volumes"]
    pools = [v["hostPath"] for v in volumes if v["name"].startswith("pool-")]
    # a pool whose disk is not mounted must fail the pod, not fill the root filesystem
    assert pools == [
        {"path": "/mnt/nvme0/tessera", "type": "Directory"},
        {"path": "/mnt/nvme1/tessera", "type": "Directory"},
    ]
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/mnt/nvme0/tessera", "/mnt/nvme1/tessera"} <= mounts


def test_file_pool_is_a_sized_image_under_var_lib_tessera(rendered: dict[str, list[Doc]]) -> None:
    ds = one(rendered["file-pool-only"], "DaemonSet", "tessera-node")
    args = container(ds, "node-agent")["args"]
    assert "--file-pool=lab=/var/lib/tessera/file-pools/lab.img:8GiB" in args
    assert not [a for a in args if a.startswith("--pool=")]


def test_several_vpgs_make_classes_and_management_ensures_each_vpg(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["several-vpgs"]
    classes = {d["metadata"]["name"]: d for d in find(docs, "StorageClass")}
    assert set(classes) == {"tessera-ext4", "tessera-xfs-local", "tessera-bulk"}
    xfs = classes["tessera-xfs-local"]
    assert xfs["parameters"] == {
        "vpg": "fast",
        "csi.storage.k8s.io/fstype": "xfs",
        "locality": "required",
        "mkfsOptions": "-m reflink=1",
    }
    assert xfs["reclaimPolicy"] == "Retain"
    assert xfs["mountOptions"] == ["noatime"]
    assert xfs["volumeBindingMode"] == "WaitForFirstConsumer"
    assert classes["tessera-bulk"]["allowVolumeExpansion"] is False
    assert classes["tessera-bulk"]["volumeBindingMode"] == "Immediate"
    default = classes["tessera-ext4"]["metadata"]["annotations"]
    assert default == {"storageclass.kubernetes.io/is-default-class": "true"}
    args = container(one(docs, "Deployment", "tessera-management"), "management")["args"]
    assert [a for a in args if a.startswith("--vpg")] == [
        "--vpg=bulk=concat",
        "--vpg=default=concat",
        "--vpg=fast=concat",
    ]


def test_layout_classes_give_management_each_vpgs_legs_and_chunk_once(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["layouts"]
    args = container(one(docs, "Deployment", "tessera-management"), "management")["args"]
    assert [a for a in args if a.startswith("--vpg")] == [
        "--vpg=default=concat",
        "--vpg=fast=raid0,legs=3,chunk=128KiB",
        "--vpg=safe=raid1",
    ]
    classes = {d["metadata"]["name"]: d for d in find(docs, "StorageClass")}
    assert classes["tessera-striped"]["parameters"]["transport"] == "nvme-tcp"
    assert "transport" not in classes["tessera-mirrored"]["parameters"]


def test_the_agent_reads_the_hosts_kernel_modules_read_only(rendered: dict[str, list[Doc]]) -> None:
    ds = one(rendered["default"], "DaemonSet", "tessera-node")
    agent = container(ds, "node-agent")
    modules = [m for m in agent["volumeMounts"] if m["mountPath"] == "/lib/modules"]
    assert modules == [{"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}]
    host = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}["lib-modules"]
    assert host["hostPath"] == {"path": "/lib/modules", "type": "Directory"}


def test_postgresql_url_reaches_management_only_from_the_secret(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["postgresql"]
    mgmt = container(one(docs, "Deployment", "tessera-management"), "management")
    assert mgmt["env"] == [
        {
            "name": "TESSERA_DB_URL",
            "valueFrom": {"secretKeyRef": {"name": "tessera-db", "key": "url"}},
        }
    ]
    assert not [a for a in mgmt["args"] if a.startswith("--db")]
    assert not find(docs, "PersistentVolumeClaim")


def test_sqlite_database_lives_on_a_kept_pvc_by_default(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    pvc = one(docs, "PersistentVolumeClaim", "tessera-management-db")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mgmt = one(docs, "Deployment", "tessera-management")
    assert mgmt["spec"]["replicas"] == 1
    assert mgmt["spec"]["strategy"] == {"type": "Recreate"}
    args = container(mgmt, "management")["args"]
    assert "--db=sqlite:////var/lib/tessera-management/tessera.db" in args
    assert "--listen=0.0.0.0:8080" in args


def test_sqlite_on_hostpath_pins_management_to_its_node(rendered: dict[str, list[Doc]]) -> None:
    mgmt = one(rendered["sqlite-hostpath"], "Deployment", "tessera-management")
    spec = mgmt["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "node-1"}
    db = next(v for v in spec["volumes"] if v["name"] == "db")
    assert db["hostPath"]["path"] == "/var/lib/tessera-management"


def test_network_policy_and_service_monitor_when_asked(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["observability"]
    policy = one(docs, "NetworkPolicy", "tessera-management")
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "10.0.0.0/16"}} in peers
    one(docs, "NetworkPolicy", "tessera-controller")
    monitor = one(docs, "ServiceMonitor", "tessera")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = [
        s
        for s in find(docs, "Service")
        if s["metadata"]["labels"].get("tessera.io/metrics") == "true"
    ]
    served = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert ports == served == {"http", "metrics", "agent-metrics"}


def test_grafana_dashboard_configmap_follows_the_dashboard_file(
    rendered: dict[str, list[Doc]],
) -> None:
    dashboard = Path(__file__).resolve().parents[2] / "charts/tessera/dashboards/tessera.json"
    maps = find(rendered["observability"], "ConfigMap")
    if dashboard.exists():
        assert len(maps) == 1
        assert maps[0]["data"]["tessera.json"].strip() == dashboard.read_text().strip()
        assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    else:
        assert maps == []


def test_existing_token_secret_replaces_the_chart_one(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["single-controller-no-capacity"]
    assert not find(docs, "Secret")
    ds = one(docs, "DaemonSet", "tessera-node")
    token = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "token")
    assert token["secret"]["secretName"] == "my-tessera-token"


def test_given_token_is_used_verbatim(helm: Helm, values_dir: Path) -> None:
    docs = helm.template(write_values(values_dir, {"auth": {"token": "s3cr3t-t0ken"}}, "token"))
    secret = one(docs, "Secret", "tessera-token")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cr3t-t0ken"


def install_notes(helm: Helm, values: Path) -> str:
    out = helm.run(
        ["install", "tessera", str(CHART), "-n", NAMESPACE, "-f", str(values), "--dry-run=client"]
    ).stdout
    return out.split("NOTES:", 1)[1]


def test_install_notes_give_a_valid_first_pvc_and_pod(helm: Helm, values_dir: Path) -> None:
    notes = install_notes(helm, write_values(values_dir, {}, "notes"))
    assert "kubectl get csidriver csi.tessera.io" in notes
    assert "rollout status daemonset/tessera-node" in notes
    manifest = textwrap.dedent(
        notes.split("<<'YAML' | kubectl apply -f -\n", 1)[1].split("YAML\n")[0]
    )
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Pod"]
    for doc in docs:
        validate(doc)
    assert docs[0]["spec"]["storageClassName"] == "tessera"


def test_packaged_chart_carries_schema_dashboard_and_notes(helm: Helm, tmp_path: Path) -> None:
    helm.run(["package", str(CHART), "--destination", str(tmp_path)])
    (archive,) = tmp_path.glob("tessera-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for wanted in [
        "tessera/Chart.yaml",
        "tessera/values.yaml",
        "tessera/values.schema.json",
        "tessera/README.md",
        "tessera/templates/NOTES.txt",
    ]:
        assert wanted in names, wanted
    if (CHART / "dashboards" / "tessera.json").exists():
        assert "tessera/dashboards/tessera.json" in names


def test_another_release_name_still_points_agents_at_its_management(
    helm: Helm, values_dir: Path
) -> None:
    docs = helm.template(write_values(values_dir, {}, "release"), release="storage")
    service = one(docs, "Service", "storage-tessera-management")
    url = f"--management=http://{service['metadata']['name']}.{NAMESPACE}.svc:8080"
    assert url in container(one(docs, "DaemonSet", "storage-tessera-node"), "node-agent")["args"]
    controller = one(docs, "Deployment", "storage-tessera-controller")
    assert url in container(controller, "tessera-csi")["args"]
    token = one(docs, "Secret", "storage-tessera-token")["metadata"]["name"]
    volumes = controller["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "token")["secret"]["secretName"] == token
