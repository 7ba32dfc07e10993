"""Engine, connection tuning and transactions, on SQLite (default) and PostgreSQL.

Two kinds of session: `read()` for lookups and `write()` for anything that
changes state. Every check-then-write step (placement, attach, expand)
must not be passed by two concurrent requests at once, whichever replica
serves them:

- SQLite: a write session starts with `BEGIN IMMEDIATE`, so those steps run
  under the database write lock (one writer at a time); a deferred
  transaction would instead fail with "database is locked" when it tried
  to upgrade.
- PostgreSQL: READ COMMITTED (set on the engine, whatever the server's
  default) plus row locks on what each check depends on: pool rows
  `FOR UPDATE` before placing or growing (management.placement.pool_space),
  the volume row before attaching, deleting or expanding
  (attachments._lock_volume, volumes._load(lock=True)), the consumer's node
  row before counting its attachments or reading its fence
  (inventory.get_node_row(lock=True)). A
  statement after the lock sees what the transaction it waited for
  committed. Chosen over SERIALIZABLE, which would make any of those
  transactions fail with a serialization error that every caller would
  have to retry; with locks the second request simply waits and then
  answers exactly as if it had come second. A get-or-insert of a row that
  does not exist yet cannot be locked: `again_on_conflict` reruns it after
  the loser's unique-key violation. The SQLite dialect omits `FOR UPDATE`.

Concurrency tests run on both: tests/unit/test_management_concurrency.py.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from management.schema import Base, MetaRow

T = TypeVar("T")
_WRITE = "tessera_write"
BUSY_TIMEOUT_MS = 30_000
#: the `meta` row holding the database's identity
EPOCH = "epoch"
#: PostgreSQL advisory lock key held while the schema is created or upgraded ("tessera" in ASCII)
SCHEMA_LOCK = 0x74657373657261


def make_engine(url: str) -> Engine:
    """One engine per process; SQLite gets WAL and explicit transaction control.

    hide_parameters: SQLAlchemy puts a failed statement's parameters in the
    error's text, and an attachment row's parameters include its TLS-PSK
    key; errors are logged (management.problems, tessera.rest), so they
    must never carry them.
    """
    if not url.startswith("sqlite"):
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            hide_parameters=True,
            # the row locks are designed for it (module docstring), whatever the server's default
            isolation_level="READ COMMITTED",
        )
        event.listen(engine, "handle_error", _withhold_detail)
        return engine
    _private_file(make_url(url).database)
    kwargs: dict[str, Any] = {
        "hide_parameters": True,
        # Sessions are short and never shared, but FastAPI runs sync handlers
        # in a threadpool, so a pooled connection may move between threads.
        "connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    }
    if url in ("sqlite://", "sqlite:///:memory:"):
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool_size=20, max_overflow=20)
    engine = create_engine(url, **kwargs)
    _install_sqlite_hooks(engine)
    return engine


def _withhold_detail(context: Any) -> None:
    """Drop the DETAIL line from a PostgreSQL error's text before anything logs it.

    hide_parameters keeps the statement's parameters out, but the server
    itself repeats values in DETAIL ("Failing row contains (..., <the
    row's TLS-PSK key>, ...)" for a NOT NULL or CHECK violation, "Key
    (...)=(...)" for a unique one). The error keeps its class and SQLSTATE,
    so callers still tell a conflict from an outage.
    """
    orig = context.original_exception
    diag = getattr(orig, "diag", None)
    if diag is None or not diag.message_detail:
        return
    text = (
        f"{diag.message_primary} (SQLSTATE {diag.sqlstate}; detail withheld: it may hold row "
        "values)"
    )
    orig.args = (text,)
    wrapped = context.sqlalchemy_exception
    if wrapped is not None:  # its text was made from the driver's before this hook ran
        kind = type(orig)
        wrapped.args = (f"({kind.__module__}.{kind.__name__}) {text}", *wrapped.args[1:])


def _private_file(path: str | None) -> None:
    """The database holds every remote attachment's TLS-PSK key: readable by its owner only.

    SQLite creates the -wal and -shm files with the database file's mode,
    so making the file 0600 before the first connection covers all three.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that our
        # "begin" hook decides between BEGIN and BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit fsyncs the WAL before it returns. NORMAL would
        # only fsync at checkpoints, so a create that the API already
        # answered (and whose file the agent fsynced) could vanish on power
        # loss, leaving a volume file no row knows about.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """The engine plus the two session factories the rest of the code uses."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        # SQLite has one writer at a time. Queueing writers on a lock here is
        # fair and immediate; leaving it to SQLite's busy handler makes them
        # sleep in growing steps (up to 100 ms each), which under 16 parallel
        # creates gave a 2 s p99. PostgreSQL locks rows instead.
        self._sqlite = url.startswith("sqlite")
        self._writer = threading.Lock() if self._sqlite else nullcontext()
        #: SQLite: the one writer's connection, kept open (checked out and
        #: returned per transaction it cost as much as the statements).
        self._writer_conn: Connection | None = None
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        self._read = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._write = sessionmaker(bind=self._write_engine, expire_on_commit=False)

    def create_tables(self) -> None:
        """Create what is missing, and bring a database an older version made up to date.

        One transaction: on PostgreSQL DDL is transactional, and replicas
        starting at once on an empty database take turns on an advisory
        lock, so the second finds the tables made instead of failing on
        its own CREATE TABLE.
        """
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            Base.metadata.create_all(conn)
            upgrade_schema(conn)
        ensure_epoch(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that holds the write lock from its first statement; commits on exit."""
        with self._writer, self._write() as session, session.begin():
            yield session

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """The same write transaction as `write()`, at the Core level.

        For the few statements every volume create runs: the ORM's unit of
        work costs more than the SQL itself there.
        """
        if not self._sqlite:
            with self._write_engine.begin() as conn:
                yield conn
            return
        with self._writer:
            if self._writer_conn is None or self._writer_conn.closed:
                self._writer_conn = self._write_engine.connect()
            try:
                with self._writer_conn.begin():
                    yield self._writer_conn
            except DBAPIError:
                # Whatever the driver said (locked by another process, I/O
                # error), the next transaction starts on a fresh connection.
                self._writer_conn.close()
                self._writer_conn = None
                raise

    def dispose(self) -> None:
        with self._writer:
            if self._writer_conn is not None:
                self._writer_conn.close()
                self._writer_conn = None
        self.engine.dispose()


def again_on_conflict(make: Callable[[], T]) -> T:
    """Run a get-or-insert transaction; if a concurrent one inserted the same key first, rerun it.

    On PostgreSQL two transactions can both find no row and both insert
    (a row lock cannot lock a row that does not exist yet); the loser's
    commit fails on the primary key. Run again, it finds the winner's row
    and takes the path for an existing one, so the caller answers as if
    it had come second, never with a 500. SQLite never gets here
    (BEGIN IMMEDIATE serialises the two).
    """
    try:
        return make()
    except IntegrityError:
        return make()


def ensure_epoch(engine: Engine) -> str:
    """The database's identity: a uuid4 made once, when the database is first opened, never changed.

    Agents compare it across heartbeats (HeartbeatReply.epoch): a database
    that was lost and recreated, or replaced by another, gets a new epoch,
    and an agent must not close exports on the word of a database that
    knows nothing of them. A database an older version made gets its epoch
    on upgrade. Two replicas starting at once: one insert wins, both read it.
    """
    with engine.begin() as conn:
        found = read_epoch(conn)
        if found:
            return found
    try:
        with engine.begin() as conn:
            conn.execute(MetaRow.__table__.insert().values(key=EPOCH, value=uuid.uuid4().hex))
    except IntegrityError:
        pass  # another replica made it first
    with engine.begin() as conn:
        return read_epoch(conn)


def read_epoch(conn: Connection | Session) -> str:
    """The epoch ensure_epoch made ("" before it ran)."""
    found = conn.execute(select(MetaRow.value).where(MetaRow.key == EPOCH)).scalar()
    return found or ""


class SchemaTooOld(RuntimeError):
    """The database lacks a column this version cannot add by itself."""


def upgrade_schema(conn: Connection) -> None:
    """Add the columns and rows a database made by an older version lacks.

    `create_all` creates missing tables but never touches existing ones, so
    without this an upgraded management would fail on its first query (or,
    worse, read an old volume as having no legs and so no space in use).
    Every later column has a server default, so adding it is one ALTER
    TABLE; volumes made before legs existed get their one leg from their
    own node, pool and size. Each step only does what is missing, so a
    crash midway is finished by the next start.
    """
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                _add_column(conn, table.name, column)
    conn.execute(
        text(
            "INSERT INTO volume_legs (volume_id, position, node_id, pool, size_bytes) "
            "SELECT id, 0, node_id, pool, size_bytes FROM volumes "
            "WHERE id NOT IN (SELECT volume_id FROM volume_legs)"
        )
    )


def _add_column(conn: Connection, table: str, column: Column[Any]) -> None:
    default = column.server_default
    if default is None or not hasattr(default, "arg"):
        raise SchemaTooOld(
            f"the database's table {table!r} has no column {column.name!r} and this version "
            "cannot add it by itself: upgrade through the release that introduced it"
        )
    kind = column.type.compile(dialect=conn.dialect)
    value = default.arg.text if hasattr(default.arg, "text") else str(default.arg)
    conn.execute(
        text(f'ALTER TABLE {table} ADD COLUMN "{column.name}" {kind} NOT NULL DEFAULT {value}')
    )
