"""The SnapshotMetadata service (CSI v1.12, alpha): allocated and changed ranges, streamed.

The brute force is the test's own record of what it wrote through the
published block device: random 4 KiB-aligned runs of random bytes, so every
written block holds data and differs from what was there. Nothing else
writes to a raw block volume, so the ranges the plugin reports must equal
those blocks exactly: allocated = every block written before the snapshot,
delta = every block written between the two snapshots.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

import grpc

from sanity.support import (
    RPC_TIMEOUT,
    SMALL,
    Code,
    Csi,
    Kind,
    assert_code,
    csi_pb2,
)
from sanity.test_snapshots import UNKNOWN_SNAPSHOT, create_snapshot

_Service = csi_pb2.PluginCapability.Service
BLOCK = 4096
SIZE = SMALL  # the block volumes csi.provision makes


def write_runs(target: Path, rng: random.Random, count: int) -> set[int]:
    """`count` runs of 1-16 blocks at random places; returns the block numbers written."""
    written: set[int] = set()
    fd = os.open(target, os.O_WRONLY)
    try:
        for _ in range(count):
            blocks = rng.randint(1, 16)
            first = rng.randrange(0, SIZE // BLOCK - blocks)
            os.pwrite(fd, os.urandom(blocks * BLOCK), first * BLOCK)
            written.update(range(first, first + blocks))
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def blocks_of(ranges: Iterable[csi_pb2.BlockMetadata]) -> set[int]:
    out: set[int] = set()
    for r in ranges:
        assert r.byte_offset % BLOCK == 0 and r.size_bytes % BLOCK == 0, r
        out.update(range(r.byte_offset // BLOCK, (r.byte_offset + r.size_bytes) // BLOCK))
    return out


def collect(
    stream: Iterable[csi_pb2.GetMetadataAllocatedResponse | csi_pb2.GetMetadataDeltaResponse],
    max_results: int = 0,
) -> list[csi_pb2.BlockMetadata]:
    """Every range of the stream, checking what the spec asks of each message."""
    ranges: list[csi_pb2.BlockMetadata] = []
    messages = 0
    for msg in stream:
        messages += 1
        assert msg.block_metadata_type == csi_pb2.VARIABLE_LENGTH
        assert msg.volume_capacity_bytes == SIZE
        if max_results:
            assert len(msg.block_metadata) <= max_results
        for r in msg.block_metadata:
            assert r.size_bytes > 0
            if ranges:
                prev = ranges[-1]
                assert prev.byte_offset + prev.size_bytes <= r.byte_offset, "overlap or disorder"
            ranges.append(r)
    assert messages >= 1
    return ranges


def allocated(csi: Csi, snapshot_id: str, **kw: int) -> list[csi_pb2.BlockMetadata]:
    req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot_id, **kw)
    stream = csi.stack.snapshot_metadata.GetMetadataAllocated(req, timeout=RPC_TIMEOUT)
    return collect(stream, kw.get("max_results", 0))


def delta(csi: Csi, base: str, target: str, **kw: int) -> list[csi_pb2.BlockMetadata]:
    req = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target, **kw)
    stream = csi.stack.snapshot_metadata.GetMetadataDelta(req, timeout=RPC_TIMEOUT)
    return collect(stream, kw.get("max_results", 0))


def stream_error(call: grpc.UnaryStreamMultiCallable, request: object) -> grpc.RpcError:
    try:
        for _ in call(request, timeout=RPC_TIMEOUT):
            pass
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"expected {type(request).__name__} to fail; the stream ended cleanly")


def test_plugin_offers_the_snapshot_metadata_service(csi: Csi) -> None:
    reply = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in reply.capabilities if c.HasField("service")}
    assert _Service.SNAPSHOT_METADATA_SERVICE in services


def test_allocated_and_delta_ranges_equal_the_blocks_written(csi: Csi) -> None:
    kind = Kind("block")
    rng = random.Random(1012)
    volume, pub = csi.provision(kind)
    assert volume.capacity_bytes == SIZE
    first = write_runs(pub.target, rng, 40)
    base = create_snapshot(csi, volume.volume_id)
    second = write_runs(pub.target, rng, 25)
    target = create_snapshot(csi, volume.volume_id)

    assert blocks_of(allocated(csi, base.snapshot_id)) == first
    assert blocks_of(allocated(csi, target.snapshot_id)) == first | second
    changed = delta(csi, base.snapshot_id, target.snapshot_id)
    assert blocks_of(changed) == second

    # paging: a message never holds more than max_results, and the ranges are the same
    assert blocks_of(delta(csi, base.snapshot_id, target.snapshot_id, max_results=1)) == second
    assert blocks_of(allocated(csi, target.snapshot_id, max_results=3)) == first | second

    # a resumed stream: nothing that ends at or before starting_offset, the rest unchanged
    middle = changed[len(changed) // 2]
    start = middle.byte_offset + BLOCK // 2 if middle.size_bytes > BLOCK else middle.byte_offset
    resumed = delta(csi, base.snapshot_id, target.snapshot_id, starting_offset=start)
    head = resumed[0]
    assert head.byte_offset + head.size_bytes > start
    # the first range may be cut at starting_offset (mid-block) or start before it
    cut = head.byte_offset % BLOCK
    resumed[0] = csi_pb2.BlockMetadata(
        byte_offset=head.byte_offset - cut, size_bytes=head.size_bytes + cut
    )
    floor = start // BLOCK
    assert {b for b in blocks_of(resumed) if b >= floor} == {b for b in second if b >= floor}
    # at the very end: an empty stream that still says the type and the capacity
    assert allocated(csi, target.snapshot_id, starting_offset=SIZE) == []


def test_metadata_calls_refuse_bad_arguments_with_the_spec_codes(csi: Csi) -> None:
    kind = Kind("block")
    sm = csi.stack.snapshot_metadata
    one = csi.create_volume(kind)
    other = csi.create_volume(kind)
    snap = create_snapshot(csi, one.volume_id)
    elsewhere = create_snapshot(csi, other.volume_id)
    cases = [
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(), Code.INVALID_ARGUMENT,
         "snapshot_id"),
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id=UNKNOWN_SNAPSHOT), Code.NOT_FOUND, UNKNOWN_SNAPSHOT),
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id="made-up"), Code.NOT_FOUND, "snapshot_id"),
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id=snap.snapshot_id, starting_offset=-1), Code.OUT_OF_RANGE,
         "starting_offset"),
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id=snap.snapshot_id, starting_offset=SIZE + 1), Code.OUT_OF_RANGE,
         "starting_offset"),
        (sm.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id=snap.snapshot_id, max_results=-1), Code.INVALID_ARGUMENT, "max_results"),
        (sm.GetMetadataDelta, csi_pb2.GetMetadataDeltaRequest(
            target_snapshot_id=snap.snapshot_id), Code.INVALID_ARGUMENT, "base_snapshot_id"),
        (sm.GetMetadataDelta, csi_pb2.GetMetadataDeltaRequest(
            base_snapshot_id=snap.snapshot_id), Code.INVALID_ARGUMENT, "target_snapshot_id"),
        (sm.GetMetadataDelta, csi_pb2.GetMetadataDeltaRequest(
            base_snapshot_id=UNKNOWN_SNAPSHOT, target_snapshot_id=snap.snapshot_id),
         Code.NOT_FOUND, UNKNOWN_SNAPSHOT),
        (sm.GetMetadataDelta, csi_pb2.GetMetadataDeltaRequest(
            base_snapshot_id=elsewhere.snapshot_id, target_snapshot_id=snap.snapshot_id),
         Code.INVALID_ARGUMENT, "same volume"),
    ]  # fmt: skip
    for call, request, code, mention in cases:
        assert_code(stream_error(call, request), code, mention)
