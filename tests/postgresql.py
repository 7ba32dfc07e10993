"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, in a temporary directory.

One server per test session (initdb + start cost about a second); every
test gets a schema of its own (PostgresServer.schema), or a database of
its own where a test needs one (PostgresServer.database), dropped
afterwards, so tests never see each other's rows. The server
listens only on a unix socket in its directory (no TCP port to collide
with anything else on the machine) and runs as an unprivileged user:
initdb and postgres refuse to run as root, so as root the directory is
given to the `postgres` user the Debian package creates.

fsync is off: the tests check what management does with a database, not
that PostgreSQL survives power loss, and fsync would make every commit
cost a disk flush.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

#: the user that owns the server's files when the tests run as root (made by Debian's package)
SERVER_USER = "postgres"
DB_USER = "tessera"
#: the database the per-test schemas live in
SHARED_DATABASE = "tessera_tests"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, or $TESSERA_PG_BINDIR."""
    if override := os.environ.get("TESSERA_PG_BINDIR"):
        return Path(override)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path  # data directory and socket directory live under it
    _shared: bool = False  # SHARED_DATABASE made

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (psycopg 3) reaching `database` over the unix socket."""
        return f"postgresql+psycopg://{DB_USER}@/{database}?host={self.socket_dir}"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, *argv], check=True, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            DB_USER,
            "--auth",
            "trust",  # only the socket exists, and its directory is private (0700)
            "--encoding",
            "UTF8",
            "--locale",
            "C.UTF-8",
            "--no-sync",
        )
        options = " ".join(
            [
                "-c listen_addresses=''",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "--wait",
            "--timeout",
            "60",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.root / "server.log"),
            "--options",
            options,
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "stop", "--pgdata", str(self.data), "--mode", "fast"
            )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one statement as the superuser (CREATE/DROP DATABASE cannot run in a transaction)."""
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "--no-psqlrc",
                "--quiet",
                "--tuples-only",
                "--no-align",
                "--set",
                "ON_ERROR_STOP=1",
                "--host",
                str(self.socket_dir),
                "--username",
                DB_USER,
                "--dbname",
                database,
                "--command",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh empty database for one test; dropped (connections and all) afterwards."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextmanager
    def schema(self) -> Iterator[str]:
        """A fresh empty schema for one test, first on the URL's search_path; dropped afterwards.

        CREATE DATABASE costs about 0.4 s here (it copies template1 through
        the WAL) and a schema a few milliseconds, for the same isolation:
        management's tables land in the schema and it sees no other. The
        connections the test left open are ended first (as DROP DATABASE
        ... WITH (FORCE) would), so none holds a lock the drop waits for.
        """
        if not self._shared:
            self.psql(f'CREATE DATABASE "{SHARED_DATABASE}"')
            self._shared = True
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE SCHEMA "{name}"', SHARED_DATABASE)
        try:
            yield f"{self.url(SHARED_DATABASE)}&options=-csearch_path%3D{name}"
        finally:
            self.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE datname = '{SHARED_DATABASE}' AND pid <> pg_backend_pid()",
                SHARED_DATABASE,
            )
            self.psql(f'DROP SCHEMA "{name}" CASCADE', SHARED_DATABASE)


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("needs PostgreSQL: Debian's `postgresql` package (scripts/bootstrap.sh)")
    if os.geteuid() == 0 and not _user_exists(SERVER_USER):
        pytest.skip(f"needs the {SERVER_USER!r} user (Debian's package makes it): not root")
    # unix socket paths are limited to ~107 bytes, so a short directory under /tmp
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="tpg-")))
    try:
        try:
            server.start()
        except subprocess.CalledProcessError as exc:
            log = server.root / "server.log"
            detail = log.read_text() if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{detail}") from exc
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
