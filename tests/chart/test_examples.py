"""Every manifest under examples/ is valid for Kubernetes 1.35 and uses Tessera as documented.

The files are picked up from the tree, so a new example is checked without
touching this test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.chart.chart import EXAMPLES, Doc, validate

FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in {".yaml", ".yml"})
DRIVER = "csi.tessera.io"
# docs/storageclass.md: any other key is refused by CreateVolume
PARAMETERS = {
    "vpg": None,
    "csi.storage.k8s.io/fstype": {"ext4", "xfs"},
    "locality": {"any", "preferred", "required"},
    "mkfsOptions": None,
}
# the classes the chart itself makes with its default values
CHART_STORAGE_CLASSES = {"tessera"}
CHART_SNAPSHOT_CLASSES = {"tessera"}


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_docs() -> list[Doc]:
    return [doc for path in FILES for doc in load(path)]


def named(kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in all_docs() if d.get("kind") == kind}


def claims(doc: Doc) -> list[Doc]:
    """The PVC specs a manifest asks for: PVCs and StatefulSet volumeClaimTemplates."""
    if doc.get("kind") == "PersistentVolumeClaim":
        return [doc["spec"]]
    if doc.get("kind") == "StatefulSet":
        return [t["spec"] for t in doc["spec"].get("volumeClaimTemplates", [])]
    return []


def rel(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


@pytest.mark.skipif(not FILES, reason="examples/ holds no manifests yet")
@pytest.mark.parametrize("path", FILES, ids=rel)
def test_example_is_valid_kubernetes_1_35(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)} holds no object"
    for doc in docs:
        validate(doc)


@pytest.mark.skipif(not FILES, reason="examples/ holds no manifests yet")
def test_example_storage_classes_use_only_documented_parameters() -> None:
    for doc in all_docs():
        if doc.get("kind") != "StorageClass":
            continue
        name = doc["metadata"]["name"]
        assert doc["provisioner"] == DRIVER, name
        for key, value in doc.get("parameters", {}).items():
            assert key in PARAMETERS, f"StorageClass {name}: parameter {key} is not documented"
            allowed = PARAMETERS[key]
            assert allowed is None or value in allowed, f"StorageClass {name}: {key}={value}"


@pytest.mark.skipif(not FILES, reason="examples/ holds no manifests yet")
def test_example_claims_name_classes_that_exist() -> None:
    classes = named("StorageClass") | CHART_STORAGE_CLASSES
    for doc in all_docs():
        for spec in claims(doc):
            wanted = spec.get("storageClassName")
            assert wanted is None or wanted in classes, (
                f"{doc['kind']} {doc['metadata']['name']} asks for StorageClass {wanted}, "
                f"which neither the chart nor examples/ makes"
            )
    snapshot_classes = named("VolumeSnapshotClass") | CHART_SNAPSHOT_CLASSES
    for doc in all_docs():
        if doc.get("kind") == "VolumeSnapshotClass":
            assert doc["driver"] == DRIVER
        if doc.get("kind") == "VolumeSnapshot":
            wanted = doc["spec"].get("volumeSnapshotClassName")
            assert wanted is None or wanted in snapshot_classes, wanted
