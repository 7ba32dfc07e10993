"""Snapshots and clones through the CLI against real management and a real agent.

The agent's pool is a directory on the test machine's filesystem, which
may not reflink, so this stack's agent runs with --copy-fallback: the
commands and what a person sees are the same whatever the method.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tessera.models import Pool, Snapshot, Volume
from tests.cli.conftest import Stack, assert_one_line_error, run_cli, running_stack


@pytest.fixture(scope="module")
def cstack() -> Iterator[Stack]:
    with running_stack("tcls-", ("--copy-fallback",)) as stack:
        yield stack


def volume_file(stack: Stack, volume_id: str) -> Path:
    return stack.dir / "pool" / "volumes" / f"{volume_id}.img"


def make_volume(stack: Stack, name: str, data: bytes) -> Volume:
    result = run_cli(stack, "volume", "create", name, "--size", "4M", "-o", "json")
    assert result.code == 0, result
    v = Volume.model_validate_json(result.out)
    with open(volume_file(stack, v.id), "r+b") as f:
        f.write(data)
    return v


def digest(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def test_snapshot_create_show_list_delete_by_name_and_id(cstack: Stack) -> None:
    v = make_volume(cstack, "snap-src", b"data" * 100)
    made = run_cli(cstack, "snapshot", "create", "snap-src", "monday", "-o", "json")
    assert made.code == 0, made
    s = Snapshot.model_validate_json(made.out)
    assert s.ready_to_use and s.source_volume_id == v.id and s.method.value == "copy"
    again = run_cli(cstack, "snapshot", "create", v.id, "monday", "-o", "json")
    assert Snapshot.model_validate_json(again.out).id == s.id
    for ref in ("monday", s.id):
        shown = run_cli(cstack, "snapshot", "show", ref)
        assert shown.code == 0 and s.id in shown.out and v.id in shown.out, shown
    listed = run_cli(cstack, "snapshot", "list")
    assert listed.code == 0 and s.id in listed.out  # whole, at 80 columns
    by_volume = run_cli(cstack, "snapshot", "list", "--volume", "snap-src", "-o", "yaml")
    assert [i["id"] for i in yaml.safe_load(by_volume.out)["items"]] == [s.id]
    wide = run_cli(cstack, "snapshot", "list", "-o", "wide")
    assert "METHOD" in wide.out and "copy" in wide.out
    deleted = run_cli(cstack, "snapshot", "delete", "monday")
    assert deleted.code == 0 and s.id in deleted.out
    line = assert_one_line_error(run_cli(cstack, "snapshot", "show", s.id), 1)
    assert s.id in line
    gone = run_cli(cstack, "snapshot", "delete", "monday", "--ignore-not-found")
    assert gone.code == 0 and "nothing to delete" in gone.out


def test_same_snapshot_name_for_another_volume_is_one_error_line(cstack: Stack) -> None:
    make_volume(cstack, "name-a", b"a")
    make_volume(cstack, "name-b", b"b")
    assert run_cli(cstack, "snapshot", "create", "name-a", "taken").code == 0
    line = assert_one_line_error(run_cli(cstack, "snapshot", "create", "name-b", "taken"), 1)
    assert "taken" in line


def test_snapshot_restore_clone_chain_keeps_the_data(cstack: Stack) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    v = make_volume(cstack, "chain-src", data)
    want = hashlib.sha256(data).hexdigest()
    assert run_cli(cstack, "snapshot", "create", "chain-src", "chain-snap").code == 0
    with open(volume_file(cstack, v.id), "r+b") as f:
        f.write(b"\0" * len(data))  # the source moves on; the snapshot must not
    restored = run_cli(cstack, "volume", "clone", "chain-snap", "chain-restored", "-o", "json")
    assert restored.code == 0, restored
    r = Volume.model_validate_json(restored.out)
    assert r.content_source is not None and r.content_source.snapshot_id
    assert digest(volume_file(cstack, r.id), len(data)) == want
    shown = run_cli(cstack, "volume", "show", "chain-restored")
    assert f"snapshot {r.content_source.snapshot_id}" in shown.out, shown
    cloned = run_cli(
        cstack, "volume", "clone", "chain-restored", "chain-clone", "--size", "8M", "-o", "json"
    )
    assert cloned.code == 0, cloned
    c = Volume.model_validate_json(cloned.out)
    assert c.size_bytes == 8 * 1024**2 and c.node_id == v.node_id
    assert digest(volume_file(cstack, c.id), len(data)) == want
    small = run_cli(cstack, "volume", "clone", "chain-restored", "chain-small", "--size", "1M")
    assert "smaller than the content source" in assert_one_line_error(small, 2)
    missing = run_cli(cstack, "volume", "clone", "no-such-source", "x")
    assert "no snapshot or volume" in assert_one_line_error(missing, 1)


def test_pool_list_shows_allocated_used_and_snapshot_method(cstack: Stack) -> None:
    table = run_cli(cstack, "pool", "list")
    assert table.code == 0, table
    header = table.out.splitlines()[0].split()
    assert {"ALLOCATED", "USED", "SNAPSHOTS"} <= set(header)
    assert "copy" in table.out
    pools = [
        Pool.model_validate(p)
        for p in json.loads(run_cli(cstack, "pool", "list", "-o", "json").out)["items"]
    ]
    assert pools[0].snapshot_method.value == "copy" and pools[0].used_bytes > 0
