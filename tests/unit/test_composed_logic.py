"""Composition logic that needs no md/dm/nvme kernel modules: superblocks, tables,
argument lists, sysfs text, conditions, which legs to assemble.

The kernel-level behaviour (arrays really made, assembled, degraded, grown)
is tested in the VM: tests/vm/guest/test_composed.py. Superblocks here are
written per the on-disk format (struct mdp_superblock_1, with its checksum)
and cross-checked against libblkid, an independent reader.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from node_agent.transports import composed
from node_agent.transports.composed import Record
from tessera.errors import FailedPrecondition, InvalidArgument
from tessera.layouts import MD_DATA_OFFSET
from tessera.models import Connection, Layout, LegConnection, Transport
from tessera.system import dm, md

ARRAY = "3f1c2a4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
OTHER = "11111111-2222-4333-8444-555555555555"
MiB = 1024 * 1024


def superblock(
    array_uuid: str = ARRAY,
    events: int = 10,
    dev_number: int = 0,
    roles: tuple[int, ...] = (0, 1),
    level: int = 1,
    name: str = "vol-abc",
) -> bytes:
    """The first 8 KiB of a v1.2 member: 4 KiB of nothing, then the superblock."""
    sb = bytearray(1024)
    struct.pack_into("<IIII", sb, 0, md.SB_MAGIC, 1, 1, 0)
    sb[16:32] = uuid.UUID(array_uuid).bytes
    sb[32 : 32 + len(name)] = name.encode()
    struct.pack_into("<QiIQII", sb, 64, 0, level, 0, 2048 * 64, 0, len(roles))
    struct.pack_into("<Q", sb, 128, MD_DATA_OFFSET // 512)  # data_offset
    struct.pack_into("<Q", sb, 136, 2048 * 64)  # data_size
    struct.pack_into("<Q", sb, 144, 8)  # super_offset
    struct.pack_into("<I", sb, 160, dev_number)
    struct.pack_into("<Q", sb, 200, events)
    struct.pack_into("<I", sb, 220, len(roles))  # max_dev
    for i, role in enumerate(roles):
        struct.pack_into("<H", sb, 256 + 2 * i, role)
    size = 256 + 2 * len(roles)
    words = struct.unpack_from(f"<{size // 4}I", sb, 0)
    csum = sum(words) + (int.from_bytes(sb[size - 2 : size], "little") if size % 4 else 0)
    csum = (csum & 0xFFFFFFFF) + (csum >> 32)
    struct.pack_into("<I", sb, 216, csum & 0xFFFFFFFF)
    return bytes(4096) + bytes(sb) + bytes(4096 - len(sb))


def leg_file(tmp_path: Path, name: str, head: bytes = b"", size: int = 16 * MiB) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(head)
    return str(path)


def mirror(*nodes: str, layout: Layout = Layout.RAID1) -> Connection:
    legs = [LegConnection(index=0, node_id=nodes[0], transport=Transport.LOOP)]
    for i, node in enumerate(nodes[1:], start=1):
        nqn = f"nqn.2026-01.io.tessera:vol-x:{node}"
        legs.append(
            LegConnection(
                index=i,
                node_id=node,
                transport=Transport.NVME_TCP,
                host=f"10.0.0.{i + 1}",
                port=4420,
                subsystem_nqn=nqn,
            )
        )
    return Connection(
        transport=Transport.COMPOSED,
        layout=layout,
        chunk_bytes=65536 if layout != Layout.RAID1 else 0,
        array_uuid=ARRAY,
        data_bytes=64 * MiB,
        legs=legs,
    )


# ---- md superblocks -------------------------------------------------------------


def test_a_members_superblock_says_its_array_events_and_slot() -> None:
    sb = md.parse_superblock(superblock(events=42, dev_number=1, roles=(0, 1)))
    assert sb is not None
    assert (sb.array_uuid, sb.events, sb.slot, sb.raid_disks) == (ARRAY, 42, 1, 2)
    assert sb.data_offset_bytes == MD_DATA_OFFSET
    assert sb.name == "vol-abc"


def test_a_faulty_or_spare_member_fills_no_slot() -> None:
    faulty = md.parse_superblock(superblock(dev_number=1, roles=(0, md.ROLE_FAULTY)))
    spare = md.parse_superblock(superblock(dev_number=2, roles=(0, 1, md.ROLE_SPARE)))
    assert faulty is not None and faulty.slot is None and faulty.role == md.ROLE_FAULTY
    assert spare is not None and spare.slot is None


def test_a_device_without_md_magic_has_no_superblock() -> None:
    assert md.parse_superblock(bytes(8192)) is None
    assert md.parse_superblock(b"\xfcN+\xa9" + bytes(100)) is None  # too short to be one


def test_our_superblock_reader_agrees_with_libblkid(tmp_path: Path) -> None:
    path = leg_file(tmp_path, "leg", superblock())
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", path], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["TYPE"] == "linux_raid_member"
    sb = md.examine(path)
    assert sb is not None and sb.array_uuid == fields["UUID"] == ARRAY


def test_stale_means_more_than_one_event_behind_the_newest() -> None:
    sb = md.parse_superblock(superblock(events=10))
    assert sb is not None
    for events, stale in ((10, False), (11, False), (12, True)):  # 11: mid-update at a crash
        newest = md.parse_superblock(superblock(events=events, dev_number=1))
        assert newest is not None and md.is_stale(sb, newest) is stale


def test_a_member_the_newest_superblock_records_as_failed_is_stale() -> None:
    sb = md.parse_superblock(superblock(events=10, dev_number=2, roles=(0, 1, 2)))
    newest = md.parse_superblock(superblock(events=11, dev_number=0, roles=(0, 1, md.ROLE_FAULTY)))
    assert sb is not None and newest is not None
    assert newest.says_failed(2) and not newest.says_failed(1)
    assert md.is_stale(sb, newest)


# ---- mdadm argument lists ----------------------------------------------------------


def test_create_pins_metadata_offset_bitmap_size_uuid_and_lists_every_leg() -> None:
    argv = md.create_argv(
        "/dev/md/vol-x", ARRAY, "vol-x", Layout.RAID10, ["/dev/loop0", "/dev/nvme1n1",
        "/dev/nvme2n1", "/dev/nvme3n1"], 32 * MiB, 65536,
    )  # fmt: skip
    assert argv[:3] == ["mdadm", "--create", "/dev/md/vol-x"]
    for opt in (
        "--metadata=1.2",
        "--level=raid10",
        "--raid-devices=4",
        f"--data-offset={MD_DATA_OFFSET // 1024}K",
        "--bitmap=internal",
        "--assume-clean",
        "--size=32768K",
        f"--uuid={ARRAY}",
        "--run",
        "--config=none",
        "--layout=n2",
        "--chunk=64K",
    ):
        assert opt in argv
    assert argv[-4:] == ["/dev/loop0", "/dev/nvme1n1", "/dev/nvme2n1", "/dev/nvme3n1"]
    raid1 = md.create_argv("/dev/md/x", ARRAY, "x", Layout.RAID1, ["/dev/a", "/dev/b"], MiB, 0)
    assert "--level=raid1" in raid1 and not any(a.startswith("--chunk") for a in raid1)


def test_assembly_names_the_uuid_and_the_devices_and_never_scans() -> None:
    argv = md.assemble_argv("/dev/md/x", ARRAY, ["/dev/loop0", "/dev/nvme1n1"], readonly=True)
    assert argv[:3] == ["mdadm", "--assemble", "/dev/md/x"]
    assert f"--uuid={ARRAY}" in argv and "--readonly" in argv and "--config=none" in argv
    assert "--scan" not in argv and "-s" not in argv
    assert argv[-2:] == ["/dev/loop0", "/dev/nvme1n1"]


def test_only_mirrored_layouts_are_md_levels() -> None:
    assert md.md_level(Layout.RAID1) == "raid1" and md.md_level("raid10") == "raid10"
    with pytest.raises(Exception, match="raid0"):
        md.md_level(Layout.RAID0)


def test_md_names_fit_the_superblock() -> None:
    assert len(md.md_name("vol-" + "a" * 32)) <= md.MAX_NAME


# ---- md sysfs text -----------------------------------------------------------------


def test_sync_progress_is_read_from_sysfs_text() -> None:
    assert md.parse_sync_completed("none\n") is None
    assert md.parse_sync_completed("1024 / 2048\n") == (1024, 2048)
    assert md.parse_sync_completed("delayed") is None
    assert md.parse_slot("none") is None and md.parse_slot("2\n") == 2
    assert md.parse_states("in_sync,write_mostly\n") == {"in_sync", "write_mostly"}


def state(*members: md.Member, sync: tuple[int, int] | None = None, action: str = "idle",
          degraded: int = 0) -> md.ArrayState:  # fmt: skip
    return md.ArrayState("/dev/md127", "raid1", 2, "clean", degraded, action, sync, list(members))


def member(name: str, slot: int | None, *states: str) -> md.Member:
    return md.Member(name, slot, frozenset(states))


def test_a_healthy_mirror_has_no_condition() -> None:
    record = Record(mirror("node-a", "node-b"), False)
    st = state(member("loop3", 0, "in_sync"), member("nvme1n1", 1, "in_sync"))
    assert composed.md_condition(st, record, {"loop3": 0, "nvme1n1": 1}) == ""


def test_a_failed_leg_is_reported_degraded_naming_its_node() -> None:
    record = Record(mirror("node-a", "node-b"), False)
    st = state(member("loop3", 0, "in_sync"), member("nvme1n1", None, "faulty"), degraded=1)
    assert (
        composed.md_condition(st, record, {"loop3": 0, "nvme1n1": 1})
        == "degraded: leg 1 (node-b) failed"
    )


def test_a_vanished_leg_is_reported_missing() -> None:
    record = Record(mirror("node-a", "node-b"), False)
    st = state(member("loop3", 0, "in_sync"), degraded=1)
    assert composed.md_condition(st, record, {"loop3": 0}) == "degraded: leg 1 (node-b) missing"


def test_a_new_leg_shows_resync_progress() -> None:
    record = Record(mirror("node-a", "node-b", "node-c"), False)
    st = state(
        member("loop3", 0, "in_sync"),
        member("nvme1n1", 1, "in_sync"),
        member("nvme2n1", None, "spare"),
        sync=(43, 100),
        action="recover",
        degraded=1,
    )
    got = composed.md_condition(st, record, {"loop3": 0, "nvme1n1": 1, "nvme2n1": 2})
    assert got == "resyncing leg 2 (node-c): 43%"


def test_a_stale_leg_left_out_is_reported() -> None:
    record = Record(mirror("node-a", "node-b"), False, stale=(1,))
    st = state(member("loop3", 0, "in_sync"), degraded=1)
    got = composed.md_condition(st, record, {"loop3": 0, "nvme1n1": 1})
    assert got == "degraded: leg 1 (node-b) is stale: not assembled"


# ---- which legs to assemble (real files, real libblkid) ---------------------------------


def test_blank_legs_are_created_not_assembled(tmp_path: Path) -> None:
    legs = {0: leg_file(tmp_path, "a"), 1: leg_file(tmp_path, "b")}
    assert composed.plan_md("vol-x", mirror("node-a", "node-b"), legs) == ([], (), [])


def test_legs_of_the_array_are_assembled_and_a_stale_one_left_out(tmp_path: Path) -> None:
    legs = {
        0: leg_file(tmp_path, "a", superblock(events=20, dev_number=0, roles=(0, 1, 2))),
        1: leg_file(tmp_path, "b", superblock(events=19, dev_number=1, roles=(0, 1, 2))),
        2: leg_file(tmp_path, "c", superblock(events=7, dev_number=2, roles=(0, 1, 2))),
    }
    members, stale, blank = composed.plan_md("vol-x", mirror("a", "b", "c"), legs)
    assert (members, stale, blank) == ([0, 1], (2,), [])


def test_a_leg_failed_one_event_ago_is_left_out(tmp_path: Path) -> None:
    failed = (0, 1, md.ROLE_FAULTY)
    legs = {
        0: leg_file(tmp_path, "a", superblock(events=20, dev_number=0, roles=failed)),
        1: leg_file(tmp_path, "b", superblock(events=20, dev_number=1, roles=failed)),
        2: leg_file(tmp_path, "c", superblock(events=19, dev_number=2, roles=(0, 1, 2))),
    }
    assert composed.plan_md("vol-x", mirror("a", "b", "c"), legs) == ([0, 1], (2,), [])


def test_a_blank_leg_beside_members_is_added_after_assembly(tmp_path: Path) -> None:
    legs = {0: leg_file(tmp_path, "a", superblock()), 1: leg_file(tmp_path, "b")}
    assert composed.plan_md("vol-x", mirror("a", "b"), legs) == ([0], (), [1])


def test_a_leg_of_another_array_is_never_touched(tmp_path: Path) -> None:
    legs = {0: leg_file(tmp_path, "a", superblock()), 1: leg_file(tmp_path, "b", superblock(OTHER))}
    with pytest.raises(FailedPrecondition, match=OTHER):
        composed.plan_md("vol-x", mirror("a", "b"), legs)


def test_no_array_is_created_over_a_filesystem(tmp_path: Path) -> None:
    legs = {0: leg_file(tmp_path, "a"), 1: leg_file(tmp_path, "b")}
    subprocess.run(["mkfs.ext4", "-q", "-F", legs[1]], check=True, capture_output=True)
    with pytest.raises(FailedPrecondition, match="leg 1.*ext4"):
        composed.plan_md("vol-x", mirror("a", "b"), legs)


# ---- dm striped tables --------------------------------------------------------------------


def test_a_stripe_table_lists_legs_in_order_with_chunk_and_length_in_sectors() -> None:
    table = dm.striped_table(["7:0", "259:1", "259:3"], 65536, 3 * 64 * MiB)
    assert table.line() == f"0 {3 * 64 * MiB // 512} striped 3 128 7:0 0 259:1 0 259:3 0"


def test_dmsetup_table_output_reads_back_to_the_same_table() -> None:
    table = dm.striped_table(["7:0", "259:1"], 131072, 256 * MiB)
    assert dm.parse_table(table.line() + "\n") == table
    assert dm.parse_table("0 2097152 linear 7:0 0\n") is None
    assert dm.parse_table("0 100 striped 2 128 7:0 0\n") is None  # a leg short


def test_a_length_that_is_not_whole_chunks_on_every_leg_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="data_bytes"):
        dm.striped_table(["7:0", "7:1"], 65536, 65536 * 3)
    with pytest.raises(InvalidArgument, match="chunk"):
        dm.striped_table(["7:0", "7:1"], 3000, 6000)
    with pytest.raises(InvalidArgument, match="2 legs"):
        dm.striped_table(["7:0"], 65536, 65536)


def test_create_and_readonly_argument_lists() -> None:
    table = dm.striped_table(["7:0", "7:1"], 65536, 2 * MiB)
    argv = dm.create_argv("tessera-vol-x", "TESSERA-vol-x", table, readonly=True)
    assert argv[:3] == ["dmsetup", "create", "--readonly"] and argv[-1] == "tessera-vol-x"
    assert argv[argv.index("--table") + 1] == table.line()
    assert argv[argv.index("--uuid") + 1] == "TESSERA-vol-x"


def test_a_grown_stripe_uses_whole_chunks_of_the_smallest_leg() -> None:
    table = dm.striped_table(["7:0", "7:1"], 65536, 2 * 64 * MiB)
    grown = composed.grown_table(table, [128 * MiB + 1000, 128 * MiB + 70000], 65536)
    assert grown is not None and grown.length == 2 * 128 * MiB // 512
    assert grown.devices == table.devices and grown.chunk == table.chunk
    assert composed.grown_table(table, [64 * MiB, 64 * MiB], 65536) is None


# ---- what composition needs from management ------------------------------------------------


def test_a_mirror_without_its_array_uuid_is_refused() -> None:
    conn = mirror("a", "b").model_copy(update={"array_uuid": ""})
    with pytest.raises(InvalidArgument, match="array_uuid"):
        composed.check_connection("vol-x", conn)


def test_too_few_legs_for_the_layout_are_refused() -> None:
    conn = mirror("a", "b", "c", "d", layout=Layout.RAID10)
    composed.check_connection("vol-x", conn)
    with pytest.raises(InvalidArgument, match="raid1 takes 2 to 3 legs, not 4"):
        composed.check_connection("vol-x", conn.model_copy(update={"layout": Layout.RAID1}))


def test_a_remote_leg_over_nbd_is_taken_without_a_subsystem() -> None:
    conn = mirror("a", "b")
    conn.legs[1] = conn.legs[1].model_copy(update={"transport": Transport.NBD, "subsystem_nqn": ""})
    composed.check_connection("vol-x", conn)


def test_an_nbd_leg_naming_an_nvme_subsystem_is_refused_naming_it() -> None:
    conn = mirror("a", "b")
    conn.legs[1] = conn.legs[1].model_copy(update={"transport": Transport.NBD})
    assert conn.legs[1].subsystem_nqn
    with pytest.raises(InvalidArgument, match="leg 1 .node b. comes over nbd and names"):
        composed.check_connection("vol-x", conn)


def test_a_remote_leg_over_a_local_only_transport_is_refused_naming_it() -> None:
    conn = mirror("a", "b")
    conn.legs[1] = conn.legs[1].model_copy(update={"transport": Transport.COMPOSED})
    with pytest.raises(InvalidArgument, match="leg 1 .node b. comes over composed"):
        composed.check_connection("vol-x", conn)


def test_a_remote_leg_of_another_volumes_subsystem_is_refused() -> None:
    conn = mirror("a", "b")
    conn.legs[1] = conn.legs[1].model_copy(
        update={"subsystem_nqn": "nqn.2026-01.io.tessera:vol-other:b"}
    )
    with pytest.raises(InvalidArgument, match="vol-other"):
        composed.check_connection("vol-x", conn)


def test_two_legs_on_one_node_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="same node"):
        composed.check_connection("vol-x", mirror("a", "a"))


def test_a_stripe_needs_every_index() -> None:
    conn = mirror("a", "b", "c", layout=Layout.RAID0)
    conn.legs[2] = conn.legs[2].model_copy(update={"index": 5})
    with pytest.raises(InvalidArgument, match="0..n-1"):
        composed.check_connection("vol-x", conn)


# ---- local legs are not loop attachments (real loop devices) -----------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_a_local_leg_never_shows_up_as_a_loop_attachment(tmp_path: Path) -> None:
    from node_agent.transports import loops

    path = leg_file(tmp_path, "vol-leg.img")
    leg = loops.bind("vol-leg", path, False, "composed", leg=True)
    plain = loops.bind("vol-plain", path, True, "loop")
    try:
        listed = loops.bound(lambda backing: "vol-leg" if backing == path else None, "loop")
        assert [d.path for d in listed] == [plain.path]
        assert loops.is_leg(leg.path) and not loops.is_leg(plain.path)
    finally:
        loops.unbind(leg)
        loops.unbind(plain)


def test_a_half_made_composed_connection_is_one_management_may_take_back(tmp_path: Path) -> None:
    transport = composed.ComposedTransport({}, tmp_path / "composed", lambda v: tmp_path / v)
    (tmp_path / "composed" / "vol-half").mkdir(parents=True)  # a crash before the record
    assert list(transport.connections()) == ["vol-half"]
    transport.disconnect("vol-half")
    assert transport.connections() == {} and not (tmp_path / "composed" / "vol-half").exists()


# ---- review fixes: growth, degraded mirrors, read-only, stale connections ----------------


def test_a_stripe_restaged_after_growth_spans_the_grown_legs_never_less_than_the_volume() -> None:
    chunk = 64 * 1024
    # publish_context still says 3 x 4 chunks; the legs grew to 8 chunks (one a bit more)
    assert composed.striped_bytes([8 * chunk, 8 * chunk + 4096, 8 * chunk], chunk, 12 * chunk) == (
        24 * chunk
    )
    assert composed.striped_bytes([4 * chunk] * 3, chunk, 12 * chunk) == 12 * chunk
    # legs smaller than the volume: the volume's size (the kernel refuses, nothing is cut)
    assert composed.striped_bytes([2 * chunk] * 3, chunk, 12 * chunk) == 12 * chunk


def test_a_mirror_runs_degraded_only_while_every_chunk_keeps_a_copy() -> None:
    assert composed.md_can_run(Layout.RAID1, 2, {0})
    assert composed.md_can_run(Layout.RAID1, 3, {2})
    assert not composed.md_can_run(Layout.RAID1, 2, set())
    assert composed.md_can_run(Layout.RAID10, 4, {0, 3})
    assert not composed.md_can_run(Layout.RAID10, 4, {2, 3})  # pair (0, 1) all gone
    assert composed.md_can_run(Layout.RAID10, 3, {0, 1})  # odd: copies on (0,1), (2,0), (1,2)
    assert not composed.md_can_run(Layout.RAID10, 3, {0})  # (1, 2) all gone
    assert not composed.md_can_run(Layout.RAID0, 3, {0, 1})  # a stripe needs every leg


def test_an_older_publish_context_keeps_the_legs_a_repair_applied() -> None:
    repaired = mirror("node-a", "node-c").model_copy(update={"generation": 2})
    stale = mirror("node-a", "node-b").model_copy(update={"generation": 1})
    applied = composed.applied_connection("vol-x", stale, Record(repaired, False))
    assert applied.legs == repaired.legs and applied.generation == 2
    newer = mirror("node-a", "node-d").model_copy(update={"generation": 3})
    assert composed.applied_connection("vol-x", newer, Record(repaired, False)) == newer
    assert composed.applied_connection("vol-x", stale, None) == stale  # no record: as given


def test_a_read_only_attach_of_a_never_written_mirror_is_refused_before_mdadm(
    tmp_path: Path,
) -> None:
    conn = mirror("node-a", "node-b")
    transport = composed.ComposedTransport({}, tmp_path / "composed", lambda v: tmp_path / v)
    legs = {0: leg_file(tmp_path, "a"), 1: leg_file(tmp_path, "b")}
    with pytest.raises(FailedPrecondition, match="never written.*read-write first"):
        transport._make_array("vol-x", Record(conn, True), legs, [])
    assert all(Path(p).read_bytes() == bytes(16 * MiB) for p in legs.values())


def test_an_older_publish_context_with_another_key_does_not_replace_the_device(
    tmp_path: Path,
) -> None:
    key = tmp_path / "vol-x.psk"
    key.write_text("node-a:" + "ab" * 32 + "\n")
    transport = composed.ComposedTransport({}, tmp_path / "composed", lambda v: key)
    repaired = mirror("node-a", "node-c").model_copy(update={"generation": 2})
    transport._write("vol-x", Record(repaired, False, key_digest="an older key"))
    device = composed.BlockDevice("vol-x", "/dev/md127", f"md:{ARRAY}", False, "composed")
    stale = mirror("node-a", "node-b").model_copy(update={"generation": 1})
    assert transport.is_current(device, stale)  # kept: reconcile ignores its legs
    assert not transport.is_current(device, repaired)  # same generation, new key: replaced
