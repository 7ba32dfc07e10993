"""Bad values stop `helm install` with a message naming the value, before anything is applied."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import CHART, Helm, HelmFailed, write_values

BAD_VALUES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("relative-kubelet-dir", {"kubeletDir": "var/lib/kubelet"}, ["/kubeletDir"]),
    ("unknown-top-level-key", {"kubletDir": "/var/lib/kubelet"}, ["kubletDir", "not allowed"]),
    (
        "latest-sidecar-tag",
        {"sidecars": {"provisioner": {"image": {"tag": "latest"}}}},
        ["/sidecars/provisioner/image/tag"],
    ),
    ("latest-tessera-tag", {"image": {"tag": "latest"}}, ["/image/tag"]),
    (
        "rolling-typo",
        {"node": {"updateStrategy": {"type": "Rolling"}}},
        ["/node/updateStrategy/type", "OnDelete"],
    ),
    (
        "btrfs-storage-class",
        {
            "storageClasses": [
                {"name": "t", "vpg": "default", "layout": "concat", "fstype": "btrfs"}
            ]
        },
        ["/storageClasses/0/fstype", "ext4"],
    ),
    (
        "striped-layout",
        {"storageClasses": [{"name": "t", "vpg": "default", "layout": "stripe", "fstype": "ext4"}]},
        ["/storageClasses/0/layout"],
    ),
    (
        "chunk-in-bytes",
        {
            "storageClasses": [
                {"name": "t", "vpg": "v", "layout": "raid0", "chunk": "65536", "fstype": "ext4"}
            ]
        },
        ["/storageClasses/0/chunk"],
    ),
    (
        "transport-typo",
        {
            "storageClasses": [
                {"name": "t", "vpg": "v", "layout": "raid0", "transport": "nvme", "fstype": "ext4"}
            ]
        },
        ["/storageClasses/0/transport"],
    ),
    (
        "locality-typo",
        {
            "storageClasses": [
                {"name": "t", "vpg": "v", "layout": "concat", "fstype": "ext4", "locality": "local"}
            ]
        },
        ["/storageClasses/0/locality"],
    ),
    (
        "pool-without-path",
        {"node": {"pools": [{"name": "nvme0"}]}},
        ["/node/pools/0", "path"],
    ),
    (
        "pool-on-root",
        {"node": {"pools": [{"name": "nvme0", "path": "/"}]}},
        ["/node/pools/0/path"],
    ),
    (
        "file-pool-size-in-kubernetes-units",
        {"node": {"filePool": {"enabled": True, "name": "file", "size": "20Gi"}}},
        ["/node/filePool/size"],
    ),
    ("zero-replicas", {"controller": {"replicas": 0}}, ["/controller/replicas"]),
    ("port-out-of-range", {"management": {"port": 70000}}, ["/management/port"]),
    (
        "mysql",
        {"management": {"database": {"type": "mysql"}}},
        ["/management/database/type"],
    ),
    (
        "network-policy-without-node-cidrs",
        {"networkPolicy": {"enabled": True}},
        ["/networkPolicy/nodeCIDRs"],
    ),
]

TEMPLATE_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    (
        "no-pool-at-all",
        {"node": {"pools": [], "filePool": {"enabled": False, "name": "f", "size": "1G"}}},
        "at least one pool",
    ),
    (
        "postgresql-without-secret",
        {"management": {"database": {"type": "postgresql"}}},
        "management.database.postgresql.existingSecret",
    ),
    (
        "hostpath-database-without-node",
        {"management": {"database": {"type": "sqlite", "sqlite": {"storage": "hostPath"}}}},
        "management.database.sqlite.hostPath.nodeSelector",
    ),
    (
        "one-vpg-two-layouts",
        {
            "storageClasses": [
                {"name": "a", "vpg": "v", "layout": "raid1", "fstype": "ext4"},
                {"name": "b", "vpg": "v", "layout": "raid0", "legs": 3, "fstype": "ext4"},
            ]
        },
        'vpg "v" is given two layouts ("raid1" and "raid0,legs=3")',
    ),
]


@pytest.mark.parametrize(("case", "values", "words"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_schema_refuses_bad_value_naming_it(
    helm: Helm, values_dir: Path, case: str, values: dict[str, Any], words: list[str]
) -> None:
    path = write_values(values_dir, values, f"bad-{case}")
    with pytest.raises(HelmFailed) as failed:
        helm.template(path)
    assert "values don't meet the specifications of the schema" in failed.value.stderr
    for word in words:
        assert word in failed.value.stderr
    with pytest.raises(HelmFailed):
        helm.lint(path)


@pytest.mark.parametrize(
    ("case", "values", "words"), TEMPLATE_REFUSALS, ids=[c[0] for c in TEMPLATE_REFUSALS]
)
def test_inconsistent_values_are_refused_with_what_to_set(
    helm: Helm, values_dir: Path, case: str, values: dict[str, Any], words: str
) -> None:
    with pytest.raises(HelmFailed) as failed:
        helm.template(write_values(values_dir, values, f"refused-{case}"))
    assert words in failed.value.stderr


def test_schema_describes_every_value_in_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, sub: dict[str, Any], path: str) -> None:
        if not isinstance(node, dict) or "properties" not in sub:
            return
        for key, value in node.items():
            assert key in sub["properties"], f"{path}/{key} is not in values.schema.json"
            walk(value, sub["properties"][key], f"{path}/{key}")

    walk(values, schema, "")
    assert schema["additionalProperties"] is False


def documented_values(readme: str) -> set[str]:
    """Value paths the README's table names, `a.b` / `.c` meaning a.b and a.c."""
    found: set[str] = set()
    for line in readme.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        tokens = re.findall(r"`([^`]+)`", first)
        base = tokens[0]
        found.add(base.replace("<name>", "*"))
        parent = base.rsplit(".", 1)[0]
        for token in tokens[1:]:
            if token.startswith("."):
                found.add((parent + token).replace("<name>", "*"))
    return found


def test_chart_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = documented_values((CHART / "README.md").read_text())

    def leaves(node: Any, path: str) -> list[str]:
        if isinstance(node, dict) and node and not path.endswith(("resources", "labels")):
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{path}.{k}".lstrip("."))]
        return [path]

    missing = []
    for leaf in leaves(values, ""):
        generic = re.sub(r"^sidecars\.[A-Za-z]+\.", "sidecars.*.", leaf)
        if leaf not in documented and generic not in documented:
            missing.append(leaf)
    assert missing == [], f"charts/tessera/README.md does not document {missing}"


def test_schema_closes_every_object_it_describes() -> None:
    """A misspelt key anywhere (not only at the top) is refused, not ignored."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            # if/then only add conditions to the object they sit in
            conditional = path.endswith(("/if", "/then", "/else"))
            closed = node.get("additionalProperties") is False
            if "properties" in node and not conditional and not closed:
                open_objects.append(path or "/")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []
