"""Pools and volume files: path safety, sparse creation, idempotency, grow-only (no root)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from node_agent import volumes
from node_agent.pools import Pool, parse_pool_spec
from tessera.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from tessera.ids import new_volume_id

MiB = 1024**2
BAD_IDS = ["../etc/passwd", "vol-../../x", "/etc/passwd", "vol-a/b", "vol-..", "..", "-rf", ""]


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    (tmp_path / "pool").mkdir()
    return Pool.open("default", tmp_path / "pool")


def test_pool_spec_parses_and_prepares_volumes_dir(tmp_path: Path) -> None:
    pool = parse_pool_spec(f"fast={tmp_path}")
    assert pool.name == "fast" and pool.directory == tmp_path.resolve()
    assert pool.volumes_dir.is_dir()
    assert pool.capacity_bytes() > 0


@pytest.mark.parametrize("spec", ["nodir", "=x", "a=", "../x=/tmp", "a/b=/tmp"])
def test_bad_pool_specs_are_refused(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_pool_spec(spec)


def test_volume_path_is_derived_inside_the_pool(pool: Pool) -> None:
    vid = new_volume_id()
    assert pool.volume_path(vid) == pool.directory / "volumes" / f"{vid}.img"
    assert pool.volume_id_of(pool.volume_path(vid)) == vid
    assert pool.volume_id_of(pool.directory / "elsewhere.img") is None


@pytest.mark.parametrize("bad", BAD_IDS)
def test_path_like_ids_are_refused_before_touching_the_fs(
    pool: Pool, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fs(*_a: object, **_k: object) -> None:
        raise AssertionError("the filesystem was touched")

    monkeypatch.setattr(os, "open", no_fs)
    monkeypatch.setattr(os, "unlink", no_fs)
    with pytest.raises((NotFound, InvalidArgument)) as info:
        volumes.create(pool, bad, MiB)
    assert info.value.field == "volume_id"
    for op in (lambda: volumes.resize(pool, bad, MiB), lambda: volumes.delete(pool, bad)):
        with pytest.raises((NotFound, InvalidArgument)):
            op()


def test_symlinked_volume_file_is_refused(pool: Pool, tmp_path: Path) -> None:
    vid = new_volume_id()
    (tmp_path / "victim").write_text("secret")
    (pool.volumes_dir / f"{vid}.img").symlink_to(tmp_path / "victim")
    with pytest.raises(InvalidArgument):
        volumes.resize(pool, vid, 10 * MiB)
    assert (tmp_path / "victim").read_text() == "secret"


def test_symlinked_volumes_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "volumes").symlink_to(tmp_path)
    with pytest.raises(InvalidArgument):
        Pool.open("p", tmp_path / "p")


def test_create_is_sparse_and_private(pool: Pool) -> None:
    vid = new_volume_id()
    vol = volumes.create(pool, vid, 1024 * MiB)
    st = os.stat(vol.path)
    assert vol.size_bytes == st.st_size == 1024 * MiB
    assert st.st_blocks * 512 < MiB, "the file must be sparse"
    assert st.st_mode & 0o777 == 0o600
    assert list(pool.volumes_dir.iterdir()) == [Path(vol.path)], "no temporaries left"


def test_create_is_idempotent_and_other_size_conflicts(pool: Pool) -> None:
    vid = new_volume_id()
    first = volumes.create(pool, vid, 8 * MiB)
    with open(first.path, "r+b") as f:
        f.write(b"data")
    again = volumes.create(pool, vid, 8 * MiB)
    assert again.model_copy(update={"allocated_bytes": 0}) == first  # now holds 4 bytes
    with open(first.path, "rb") as f:
        assert f.read(4) == b"data", "idempotent create must not touch the data"
    with pytest.raises(AlreadyExists):
        volumes.create(pool, vid, 16 * MiB)


def test_concurrent_creates_converge(pool: Pool) -> None:
    vid = new_volume_id()
    results: list[object] = []

    def create() -> None:
        results.append(volumes.create(pool, vid, 4 * MiB).size_bytes)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [4 * MiB] * 8


def test_resize_grows_only(pool: Pool) -> None:
    vid = new_volume_id()
    volumes.create(pool, vid, 8 * MiB)
    assert volumes.resize(pool, vid, 16 * MiB).size_bytes == 16 * MiB
    assert volumes.resize(pool, vid, 16 * MiB).size_bytes == 16 * MiB
    with pytest.raises(OutOfRange) as info:
        volumes.resize(pool, vid, 8 * MiB)
    assert info.value.field == "size_bytes"
    with pytest.raises(NotFound):
        volumes.resize(pool, new_volume_id(), MiB)


def test_delete_is_idempotent(pool: Pool) -> None:
    vid = new_volume_id()
    volumes.create(pool, vid, MiB)
    volumes.delete(pool, vid)
    volumes.delete(pool, vid)
    assert not volumes.exists(pool, vid)


def test_half_created_files_are_swept_and_never_look_complete(pool: Pool) -> None:
    vid = new_volume_id()
    tmp = pool.volumes_dir / f"{volumes.TMP_PREFIX}{vid}-deadbeef"
    tmp.write_bytes(b"")  # what a crash between open and link leaves
    assert not volumes.exists(pool, vid)
    assert volumes.sweep_temporaries(pool) == [tmp]
    assert not tmp.exists()


def test_a_named_but_empty_volume_file_left_by_a_crash_is_finished(pool: Pool) -> None:
    vid = new_volume_id()
    pool.volume_path(vid, missing_is_not_found=False).touch(mode=0o600)
    assert volumes.create(pool, vid, 10 * MiB).size_bytes == 10 * MiB
