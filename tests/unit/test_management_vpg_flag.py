"""`tessera-management --vpg NAME=LAYOUT`: vpgs ensured at start, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from management.db import Database
from management.inventory import parse_vpg_flag
from management.schema import VpgRow
from tessera.clients import ManagementClient
from tessera.errors import InvalidArgument
from tests.unit.management_fixtures import TOKEN

pytest_plugins = ["tests.unit.management_fixtures"]


def command(db_url: str, token_file: Path, *extra: str, listen: str = "127.0.0.1:0") -> list[str]:
    return [
        sys.executable,
        "-m",
        "management",
        "--listen",
        listen,
        "--db",
        db_url,
        "--token-file",
        str(token_file),
        "--reconcile-interval",
        "0",
        *extra,
    ]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def vpgs_served(db_url: str, token_file: Path, log: Path, *flags: str) -> dict[str, str]:
    """Start management with `flags`, wait until it answers, and list its vpgs."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tsv-"))  # unix socket paths are short
    sock = sock_dir / "m.sock"
    try:
        argv = command(db_url, token_file, *flags, listen=f"unix://{sock}")
        with running(argv, log) as proc:
            client = ManagementClient(f"unix://{sock}", TOKEN)
            try:
                deadline = time.monotonic() + 30
                while not client.healthy():
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                return {v.name: v.layout for v in client.list_vpgs().items}
            finally:
                client.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_vpgs_given_as_flags_exist_after_start_and_a_restart_with_them_changes_nothing(
    db_url, token_file, tmp_path
):
    flags = ("--vpg", "fast=concat", "--vpg", "bulk=concat")
    first = vpgs_served(db_url, token_file, tmp_path / "1.log", *flags)
    assert first == {"default": "concat", "fast": "concat", "bulk": "concat"}
    again = vpgs_served(db_url, token_file, tmp_path / "2.log", *flags, "--vpg", "fast=concat")
    assert again == first


def test_a_vpg_flag_with_another_layout_than_the_stored_vpg_stops_the_start_naming_both(
    db_url, token_file
):
    db = Database(db_url)
    db.create_tables()
    with db.write() as s:  # made by a release with more layouts, or by hand
        s.add(VpgRow(name="fast", layout="raid1"))
    try:
        done = subprocess.run(
            command(db_url, token_file, "--vpg", "fast=concat"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert "--vpg fast=concat" in done.stderr and "'raid1'" in done.stderr, done.stderr
        with db.read() as s:
            assert s.get(VpgRow, "fast").layout == "raid1"  # never changed under its volumes
    finally:
        db.dispose()


def test_an_unsupported_layout_in_a_vpg_flag_is_a_usage_error_before_the_database_is_touched(
    token_file, tmp_path
):
    db = tmp_path / "never.db"
    done = subprocess.run(
        command(f"sqlite:///{db}", token_file, "--vpg", "fast=raid5"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "'raid5' is not one of concat, raid0, raid1, raid10" in done.stderr
    assert not db.exists()


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("fast", "expected NAME=LAYOUT"),
        ("fast=", "expected NAME=LAYOUT"),
        ("=concat", "the name must be"),
        ("a..b=concat", "the name must be"),
        ("../x=concat", "the name must be"),
        ("x" * 64 + "=concat", "the name must be"),
        ("fast=striped", "is not one of"),
        ("safe=raid1,legs=4", "legs 4 is outside 2-3"),
        ("safe=raid1,legs=x", "legs='x' is not a number"),
        ("safe=raid1,chunk=64K", "chunk_bytes applies to striped layouts"),
        ("wide=raid0,chunk=3K", "must be a power of two of at least 4 KiB"),
        ("wide=raid0,chunk=6K", "must be a power of two"),
        ("wide=raid0,legs=2,legs=3", "each once"),
        ("wide=raid0,width=2", "is not legs=N or chunk=SIZE"),
        ("wide=raid0,legs=17", "legs must be 0-16"),
    ],
)
def test_a_malformed_vpg_flag_is_refused_saying_what_is_wrong(flag, says):
    with pytest.raises(InvalidArgument, match=says) as err:
        parse_vpg_flag(flag)
    assert err.value.field == "vpg"


def test_a_well_formed_vpg_flag_names_the_vpg_and_its_layout():
    req = parse_vpg_flag("fast-nvme=concat")
    assert (req.name, req.layout) == ("fast-nvme", "concat")


def test_a_vpg_flag_gives_a_layouts_legs_and_chunk():
    req = parse_vpg_flag("wide=raid10,legs=6,chunk=128K")
    assert (req.layout, req.legs, req.chunk_bytes) == ("raid10", 6, 128 * 1024)
    assert parse_vpg_flag("safe=raid1").legs == 0  # the layout's default, resolved at create
