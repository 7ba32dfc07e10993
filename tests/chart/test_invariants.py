"""The chart's own invariants, checked on every variant.

Each one is a promise to the cluster admin: pinned images, mount propagation
only where the kubelet needs it, the documented RBAC verbs and nothing more,
probes everywhere, privilege only for the data path.
"""

from __future__ import annotations

import re

import pytest

from tests.chart.chart import CHART, Doc, containers, find, one, pod_spec
from tests.chart.variants import VARIANTS

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

# (apiGroup, resource, verb) each ClusterRole may grant: the verbs the
# sidecar's upstream deploy/kubernetes/rbac.yaml documents for a driver
# without secrets. A new verb must be added here on purpose.
READ = ("get", "list", "watch")
EVENTS = ("list", "watch", "create", "update", "patch")


def _rules(*entries: tuple[str, str, tuple[str, ...]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for g, r, verbs in entries for v in verbs}


ALLOWED_CLUSTER_RULES = {
    "provisioner": _rules(
        ("", "persistentvolumes", (*READ, "create", "patch", "delete")),
        ("", "persistentvolumeclaims", (*READ, "update")),
        ("storage.k8s.io", "storageclasses", READ),
        ("", "events", EVENTS),
        ("", "nodes", READ),
        ("storage.k8s.io", "csinodes", READ),
        ("storage.k8s.io", "volumeattachments", READ),
        ("storage.k8s.io", "volumeattributesclasses", READ),
    ),
    "attacher": _rules(
        ("", "persistentvolumes", (*READ, "patch")),
        ("storage.k8s.io", "csinodes", READ),
        ("storage.k8s.io", "volumeattachments", (*READ, "patch")),
        ("storage.k8s.io", "volumeattachments/status", ("patch",)),
    ),
    "resizer": _rules(
        ("", "persistentvolumes", (*READ, "patch")),
        ("", "persistentvolumeclaims", READ),
        ("", "persistentvolumeclaims/status", ("patch",)),
        ("", "events", EVENTS),
        ("storage.k8s.io", "volumeattributesclasses", READ),
    ),
    "snapshotter": _rules(
        ("", "events", EVENTS),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", READ),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", (*READ, "update", "patch")),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("update", "patch")),
    ),
    "node": _rules(("", "nodes", ("get",))),
}
# snapshots.groupSnapshots: the snapshotter's group snapshot contents
SNAPSHOTTER_GROUP_RULES = _rules(
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", READ),
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", (*READ, "update", "patch")),
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", ("update", "patch")),
)
# a PVC restored from a snapshot: the provisioner reads the snapshot objects
PROVISIONER_SNAPSHOT_RULES = _rules(
    ("snapshot.storage.k8s.io", "volumesnapshots", ("get", "list")),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list")),
)
LEASES = _rules(
    ("coordination.k8s.io", "leases", ("get", "watch", "list", "delete", "update", "create"))
)
CAPACITY = _rules(
    (
        "storage.k8s.io",
        "csistoragecapacities",
        (*READ, "create", "update", "patch", "delete"),
    ),
    ("", "pods", ("get",)),
    ("apps", "replicasets", ("get",)),
)

variants = pytest.mark.parametrize("variant", VARIANTS)


def granted(role: Doc) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role.get("rules", [])
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


@variants
def test_every_image_is_pinned_by_tag_or_digest(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    for workload, c in containers(rendered[variant]):
        image = c["image"]
        where = f"{workload['metadata']['name']}/{c['name']}: {image}"
        if "@" in image:
            assert DIGEST.match(image.split("@", 1)[1]), where
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{where} has no tag"
        assert tag and tag != "latest", f"{where} is not pinned"
        assert c["imagePullPolicy"] == "IfNotPresent", where


def test_tessera_image_defaults_to_the_chart_app_version(rendered: dict[str, list[Doc]]) -> None:
    app_version = next(
        line.split(":", 1)[1].strip().strip('"')
        for line in (CHART / "Chart.yaml").read_text().splitlines()
        if line.startswith("appVersion:")
    )
    ours = {
        c["image"]
        for _, c in containers(rendered["default"])
        if c["name"] in {"tessera-csi", "node-agent", "management"}
    }
    assert ours == {f"ghcr.io/tessera-csi/tessera:{app_version}"}


@variants
def test_only_the_kubelet_pods_and_plugins_mounts_are_bidirectional(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    kubelet = VARIANTS[variant].get("kubeletDir", "/var/lib/kubelet")
    allowed = {f"{kubelet}/pods", f"{kubelet}/plugins"}
    seen = set()
    for workload, c in containers(rendered[variant]):
        spec = pod_spec(workload)
        assert spec is not None
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            if mount.get("mountPropagation") != "Bidirectional":
                continue
            where = f"{workload['metadata']['name']}/{c['name']} {mount['mountPath']}"
            assert mount["mountPath"] in allowed, where
            # the container sees the kubelet's directory at the kubelet's own path
            assert volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"], where
            assert c["securityContext"].get("privileged") is True, where
            seen.add((c["name"], mount["mountPath"]))
    assert seen == {("tessera-csi", path) for path in allowed}


@variants
def test_every_container_has_liveness_and_readiness_probes(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    for workload, c in containers(rendered[variant], init=False):
        where = f"{workload['metadata']['name']}/{c['name']}"
        assert "livenessProbe" in c, f"{where} has no liveness probe"
        assert "readinessProbe" in c, f"{where} has no readiness probe"
        for probe in (c["livenessProbe"], c["readinessProbe"]):
            port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
            if isinstance(port, str):
                # the kubelet resolves a named port in the probed container only
                names = {p["name"] for p in c.get("ports", [])}
                assert port in names, f"{where} probes port {port} it does not declare"


@variants
def test_only_the_node_plugin_and_agent_are_privileged(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    privileged = {
        (w["kind"], c["name"])
        for w, c in containers(rendered[variant])
        if c.get("securityContext", {}).get("privileged")
    }
    assert privileged == {("DaemonSet", "tessera-csi"), ("DaemonSet", "node-agent")}
    for w, c in containers(rendered[variant]):
        if (w["kind"], c["name"]) in privileged:
            # the image runs as 65532 unless told: privileged alone gives a
            # non-root process no effective capabilities
            assert c["securityContext"]["runAsUser"] == 0, c["name"]
    for w, c in containers(rendered[variant]):
        if (w["kind"], c["name"]) in privileged:
            continue
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert "ALL" in sc["capabilities"]["drop"], c["name"]


@variants
def test_cluster_roles_grant_exactly_the_documented_verbs(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    values = VARIANTS[variant]
    snapshots = values.get("snapshots", {}).get("enabled", True)  # on by default
    roles = {
        r["metadata"]["name"].removeprefix("tessera-"): r
        for r in find(rendered[variant], "ClusterRole")
    }
    expected = dict(ALLOWED_CLUSTER_RULES)
    if snapshots:
        expected["provisioner"] = expected["provisioner"] | PROVISIONER_SNAPSHOT_RULES
        if values.get("snapshots", {}).get("groupSnapshots", False):
            expected["snapshotter"] = expected["snapshotter"] | SNAPSHOTTER_GROUP_RULES
    else:
        del expected["snapshotter"]
    assert set(roles) == set(expected)
    for name, role in roles.items():
        extra = granted(role) - expected[name]
        missing = expected[name] - granted(role)
        assert not extra, f"ClusterRole {name} grants more than documented: {sorted(extra)}"
        assert not missing, f"ClusterRole {name} lacks {sorted(missing)}"


@variants
def test_namespaced_role_is_leases_and_capacity_only(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    capacity = VARIANTS[variant].get("capacityTracking", {}).get("enabled", True)
    role = one(rendered[variant], "Role", "tessera-controller")
    assert role["metadata"]["namespace"] == "tessera-system"
    assert granted(role) == (LEASES | CAPACITY if capacity else LEASES)


@variants
def test_no_role_touches_secrets_configmaps_or_wildcards(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    for role in find(rendered[variant], "ClusterRole") + find(rendered[variant], "Role"):
        for group, resource, verb in granted(role):
            where = f"{role['kind']} {role['metadata']['name']}"
            assert resource.split("/")[0] not in {"secrets", "configmaps"}, where
            assert "*" not in (group, resource, verb), where


@variants
def test_bindings_tie_each_role_to_its_components_service_account(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    docs = rendered[variant]
    accounts = {a["metadata"]["name"] for a in find(docs, "ServiceAccount")}
    roles = {
        (r["kind"], r["metadata"]["name"]) for r in find(docs, "ClusterRole") + find(docs, "Role")
    }
    for binding in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding"):
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"]) in roles, binding["metadata"]["name"]
        for subject in binding["subjects"]:
            assert subject["name"] in accounts
            assert subject["namespace"] == "tessera-system"
        component = "node" if ref["name"] == "tessera-node" else "controller"
        assert [s["name"] for s in binding["subjects"]] == [f"tessera-{component}"]
    for workload, _ in containers(docs):
        spec = pod_spec(workload)
        assert spec is not None
        assert spec["serviceAccountName"] in accounts
    management = one(docs, "ServiceAccount", "tessera-management")
    assert management["automountServiceAccountToken"] is False


@variants
def test_every_container_has_requests_and_a_memory_limit(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    for workload, c in containers(rendered[variant]):
        res = c.get("resources", {})
        where = f"{workload['metadata']['name']}/{c['name']}"
        assert {"cpu", "memory"} <= set(res.get("requests", {})), where
        assert "memory" in res.get("limits", {}), where


def test_priority_classes_keep_the_driver_scheduled(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    classes = {
        w["metadata"]["name"]: pod_spec(w)["priorityClassName"]  # type: ignore[index]
        for w in find(docs, "Deployment") + find(docs, "DaemonSet")
    }
    assert classes == {
        "tessera-controller": "system-cluster-critical",
        "tessera-management": "system-cluster-critical",
        "tessera-node": "system-node-critical",
    }


def test_ports_follow_the_contract(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]

    def ports(kind: str, name: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, c in containers([one(docs, kind, name)]):
            for p in c.get("ports", []):
                found[f"{c['name']}/{p['name']}"] = p["containerPort"]
        return found

    assert ports("Deployment", "tessera-management") == {"management/http": 8080}
    controller = ports("Deployment", "tessera-controller")
    assert controller["tessera-csi/metrics"] == 9810
    assert controller["tessera-csi/healthz"] == 9808  # the liveness-probe sidecar serves it
    node = ports("DaemonSet", "tessera-node")
    assert node["tessera-csi/metrics"] == 9811
    assert node["tessera-csi/healthz"] == 9809
    assert node["node-agent/agent"] == 9700
    # hostNetwork: every port of the node pod is a port on the host
    assert len(set(node.values())) == len(node)


def test_sidecars_are_the_required_major_versions(rendered: dict[str, list[Doc]]) -> None:
    wanted = {
        "csi-provisioner": ("registry.k8s.io/sig-storage/csi-provisioner", "v6."),
        "csi-attacher": ("registry.k8s.io/sig-storage/csi-attacher", "v4."),
        "csi-resizer": ("registry.k8s.io/sig-storage/csi-resizer", "v2."),
        "csi-snapshotter": ("registry.k8s.io/sig-storage/csi-snapshotter", "v8."),
        "liveness-probe": ("registry.k8s.io/sig-storage/livenessprobe", "v2."),
        "node-driver-registrar": ("registry.k8s.io/sig-storage/csi-node-driver-registrar", "v2."),
    }
    seen = set()
    for _, c in containers(rendered["snapshots-on"]):
        if c["name"] in wanted:
            repository, major = wanted[c["name"]]
            name, _, tag = c["image"].rpartition(":")
            assert name == repository and tag.startswith(major), c["image"]
            seen.add(c["name"])
    assert seen == set(wanted)


@variants
def test_tessera_containers_keep_the_image_entrypoint(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    """tini stays PID 1 and reaps the daemonized nbdkit/nbdfuse: no `command` override."""
    executables = {"tessera-csi", "tessera-node-agent", "tessera-management", "chown"}
    for workload, c in containers(rendered[variant]):
        if not c["image"].startswith("ghcr.io/tessera-csi/tessera"):
            continue
        where = f"{workload['metadata']['name']}/{c['name']}"
        assert "command" not in c, where
        assert c["args"][0] in executables, where


@variants
def test_pod_wiring_is_what_the_api_server_and_kubelet_accept(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    """What schema validation cannot see: names that must point at each other."""
    docs = rendered[variant]
    for workload in find(docs, "Deployment") + find(docs, "DaemonSet"):
        name = workload["metadata"]["name"]
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match its pods"
        spec = pod_spec(workload)
        assert spec is not None
        volumes = {v["name"] for v in spec.get("volumes", [])}
        used = set()
        for _, c in containers([workload]):
            env = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                for var in re.findall(r"\$\(([A-Z_]+)\)", arg):
                    # the kubelet expands $(VAR) from the container's own env only
                    assert var in env, f"{name}/{c['name']}: {arg} needs env {var}"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{c['name']}: no volume {mount['name']}"
                used.add(mount["name"])
        assert used == volumes, f"{name}: volumes never mounted: {volumes - used}"


@variants
def test_services_reach_named_ports_of_their_pods(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    docs = rendered[variant]
    workloads = find(docs, "Deployment") + find(docs, "DaemonSet")
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        backends = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(backends) == 1, service["metadata"]["name"]
        names = {p["name"] for _, c in containers(backends) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"


def test_group_snapshots_turn_on_the_snapshotters_gate_only_when_asked(
    rendered: dict[str, list[Doc]],
) -> None:
    """With the gate on and the group snapshot CRDs missing, csi-snapshotter stops serving
    ordinary snapshots too: the gate is opt-in."""

    def snapshotter_args(variant: str) -> list[str]:
        deploy = one(rendered[variant], "Deployment", "tessera-controller")
        containers = deploy["spec"]["template"]["spec"]["containers"]
        return next(c["args"] for c in containers if c["name"] == "csi-snapshotter")

    assert "--feature-gates=CSIVolumeGroupSnapshot=true" in snapshotter_args("snapshots-on")
    assert not any("CSIVolumeGroupSnapshot" in a for a in snapshotter_args("default"))
