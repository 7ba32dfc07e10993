"""A volume reached from any node, with the access modes enforced across nodes.

Three nodes in network namespaces; every volume lives on n1 and is used from
n2 and n3 through the CSI sockets, so every byte crosses an NBD export
(nbdkit, TLS-PSK) and an nbdfuse + loop client.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tests.multihost.support import (
    RPC_TIMEOUT,
    Cluster,
    Code,
    Kube,
    MiB,
    assert_code,
    block_cap,
    call_error,
    errno_name,
    mount_cap,
    needs_root,
    needs_tools,
)

pytestmark = [needs_root, needs_tools]

#: what publish_context may carry (docs/data-path.md); never a key
CONTEXT_KEYS = {"transport", "ownerNode", "readonly", "host", "port", "pskIdentity"}


@pytest.mark.parametrize("kind", ["block", "ext4"])
def test_data_written_on_one_node_is_intact_after_the_volume_moves_to_a_third(
    cluster: Cluster, kube: Kube, kind: str
) -> None:
    cap = block_cap() if kind == "block" else mount_cap()
    vid = kube.create(cap, on="n1")
    assert cluster.mgmt.get_volume(vid).node_id == "n1"
    on_n2 = kube.publish(vid, "n2", cap)
    ctx = on_n2.publish_context
    assert (ctx.get("transport"), ctx.get("ownerNode")) == ("nbd", "n1"), ctx
    assert set(ctx) <= CONTEXT_KEYS, f"publish_context carries undocumented keys: {ctx}"
    if kind == "block":
        written = cluster.io("n2", "write", on_n2.target, 0, 4 * MiB, 1)
    else:
        written = cluster.io("n2", "fwrite", on_n2.target, "data.bin", 4 * MiB, 1)
    kube.unpublish(on_n2)

    # n3 stages the filesystem n2 made (never formats it again) and reads the same bytes.
    on_n3 = kube.publish(vid, "n3", cap)
    if kind == "block":
        assert cluster.io("n3", "read", on_n3.target, 0, 4 * MiB) == written
    else:
        assert cluster.io("n3", "fread", on_n3.target, "data.bin") == written


def test_block_volume_shared_by_two_nodes_shows_each_nodes_writes_to_the_other(
    cluster: Cluster, kube: Kube
) -> None:
    rwx = block_cap("MULTI_NODE_MULTI_WRITER")
    vid = kube.create(rwx, on="n1")
    a, b = kube.publish(vid, "n2", rwx), kube.publish(vid, "n3", rwx)

    first = cluster.io("n2", "write", a.target, 0, MiB, 2)
    assert cluster.io("n3", "read", b.target, 0, MiB) == first
    other = cluster.io("n3", "write", b.target, MiB, MiB, 3)
    assert cluster.io("n2", "read", a.target, MiB, MiB) == other
    # n3 has read the first region once; n2 overwrites it: n3 must not answer from a cache.
    again = cluster.io("n2", "write", a.target, 0, MiB, 4)
    assert again != first
    assert cluster.io("n3", "read", b.target, 0, MiB) == again


def test_block_single_writer_volume_has_one_writer_node_and_readers_elsewhere(
    cluster: Cluster, kube: Kube
) -> None:
    mnsw = block_cap("MULTI_NODE_SINGLE_WRITER")
    vid = kube.create(mnsw, on="n1")
    writer = kube.publish(vid, "n2", mnsw)
    err = call_error(lambda: kube.controller_publish(vid, "n3", mnsw))
    assert_code(err, Code.FAILED_PRECONDITION, "n2")
    reader = kube.publish(vid, "n3", mnsw, readonly=True)
    data = cluster.io("n2", "write", writer.target, 0, MiB, 7)
    assert cluster.io("n3", "read", reader.target, 0, MiB) == data
    answer = cluster.io("n3", "trywrite", reader.target, 0)
    assert errno_name(answer) in {"EROFS", "EPERM", "EACCES"}, f"the reader wrote: {answer}"


def test_filesystem_shared_read_only_reads_everywhere_and_refuses_writes_everywhere(
    cluster: Cluster, kube: Kube
) -> None:
    rwo, rox = mount_cap("SINGLE_NODE_WRITER"), mount_cap("MULTI_NODE_READER_ONLY")
    vid = kube.create([rwo, rox], on="n1")
    # A read-only volume is only useful with data on it: a writer fills it first.
    writer = kube.publish(vid, "n2", rwo)
    digest = cluster.io("n2", "fwrite", writer.target, "data.bin", MiB, 5)
    kube.unpublish(writer)

    readers = [kube.publish(vid, node, rox, readonly=True) for node in ("n2", "n3")]
    for pub in readers:
        assert pub.publish_context.get("readonly") == "true", pub.publish_context
        assert cluster.io(pub.node_id, "fread", pub.target, "data.bin") == digest
        answer = cluster.io(pub.node_id, "tryfwrite", pub.target)
        assert errno_name(answer) == "EROFS", f"a write on {pub.node_id} answered {answer}"
    owner = cluster.agent("n1")
    try:
        exports = [e for e in owner.list_exports() if e.volume_id == vid]
    finally:
        owner.close()
    assert sorted(e.client_node for e in exports) == ["n2", "n3"]
    assert all(e.readonly for e in exports), f"the export itself must be read-only: {exports}"


def test_single_node_volume_in_use_on_n2_is_refused_on_n3_naming_n2(
    cluster: Cluster, kube: Kube
) -> None:
    vid = kube.create(block_cap(), on="n1")
    kube.controller_publish(vid, "n2", block_cap())
    err = call_error(lambda: kube.controller_publish(vid, "n3", block_cap()))
    assert_code(err, Code.FAILED_PRECONDITION, "n2")
    # A retry of the publish that holds it still answers OK (idempotent).
    kube.controller_publish(vid, "n2", block_cap())


def test_publish_to_a_node_management_does_not_know_is_not_found(
    cluster: Cluster, kube: Kube
) -> None:
    vid = kube.create(block_cap(), on="n1")
    err = call_error(lambda: kube.controller_publish(vid, "n9", block_cap()))
    assert_code(err, Code.NOT_FOUND, "n9")


def test_remote_volume_grown_while_published_shows_its_new_size_once_staged_again(
    cluster: Cluster, kube: Kube
) -> None:
    vid = kube.create(block_cap(), on="n1")
    pub = kube.publish(vid, "n2", block_cap())
    data = cluster.io("n2", "write", pub.target, 0, MiB, 6)
    reply = cluster.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid,
            capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB),
            volume_capability=block_cap(),
        ),
        timeout=RPC_TIMEOUT,
    )
    assert reply.capacity_bytes >= 96 * MiB
    kube.unpublish(pub)
    again = kube.publish(vid, "n2", block_cap())
    assert int(cluster.io("n2", "size", again.target)) == reply.capacity_bytes
    assert cluster.io("n2", "read", again.target, 0, MiB) == data


def nbd_read_size(
    cluster: Cluster, node_id: str, ctx: dict[str, str], identity: str, key_file: Path
) -> subprocess.CompletedProcess[str]:
    """`nbdinfo --size` on the export as `identity` with the key in key_file, from node_id."""
    uri = f"nbds://{identity}@{ctx['host']}:{ctx['port']}/?tls-psk-file={key_file}"
    return subprocess.run(
        cluster.argv_on(node_id, ["nbdinfo", "--size", uri]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def private_file(path: Path, text: str) -> Path:
    """A key file as nbdinfo wants it: 0600 from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_only_the_consumer_holds_the_key_and_a_wrong_or_revoked_key_cannot_read_the_export(
    cluster: Cluster, kube: Kube, tmp_path: Path
) -> None:
    vid = kube.create(block_cap(), on="n1")
    ctx = kube.controller_publish(vid, "n2", block_cap())
    assert ctx.get("pskIdentity") == "n2", ctx
    key_file = Path(cluster.node("n2").state_dir) / "keys" / f"{vid}.psk"
    assert key_file.stat().st_mode & 0o077 == 0, "the key file must be readable by root only"
    key_line = key_file.read_text()
    assert not any(key_line.split(":")[-1].strip() in v for v in ctx.values()), "key in context"
    good = private_file(tmp_path / "good.psk", key_line)
    ok = nbd_read_size(cluster, "n2", ctx, "n2", good)
    assert ok.returncode == 0, f"n2's own key must read the export: {ok.stderr}"
    assert int(ok.stdout.strip()) >= 64 * MiB

    wrong = private_file(tmp_path / "wrong.psk", "n2:" + "ab" * 32 + "\n")
    assert nbd_read_size(cluster, "n2", ctx, "n2", wrong).returncode != 0, "a wrong key read it"
    # The key is the access control (nbdkit 1.32's ip filter cannot parse an
    # address): it goes to the consumer only, never to another node.
    for other in ("n1", "n3"):
        assert not (Path(cluster.node(other).state_dir) / "keys" / f"{vid}.psk").exists()

    kube.controller_unpublish(vid, "n2")
    revoked = nbd_read_size(cluster, "n2", ctx, "n2", good)
    assert revoked.returncode != 0, "the key of a released attachment still reads the export"
    assert not key_file.exists(), "the consumer kept the key of a released attachment"
