"""Registering this node and its pools with management, and staying registered.

Management may start after the agent, restart, or lose its database; the
agent's local API must serve regardless (the data path never waits for the
control plane). So registration runs in a background thread: retry with
backoff until management answers, then heartbeat every 10 s and register
again whenever management says it does not know this node.

Pool capacities are measured again after every heartbeat and sent when they
changed: other files on a pool's filesystem or metadata growth move what
the pool can really give, and management must place against that number,
not the one seen at start. Changes below 1/256 of the capacity are not
sent: the pool's reserve (default 2%) absorbs them, and a capacity that
twitches with every journal block would make GetCapacity answers noisy.

Each heartbeat's answer says what management still wants of this node:
the remote attachments of volumes it owns (`exports`) and the remote
volumes attached here (`attachments`). What it no longer wants (a fenced
or detached node's export, a volume management took back) is cleaned up,
but only what existed before the heartbeat was sent: an attach racing
the heartbeat is not in a reply computed before it, and must not be
undone by it (`Follower`).

A reply is acted on only while it comes from the database this node
registered with (`HeartbeatReply.epoch`, persisted in
`<state-dir>/management-epoch`): a management that lost its database, or
was restored from an old backup or replaced, answers with another epoch
and lists nothing it does not know, and closing every export and
connection on its word would hand every consumer EIO. Such a reply only
keeps the node alive; an admin who replaced the database on purpose
deletes the file and the next heartbeat adopts the new epoch.

The cleanup runs in its own thread, one at a time: closing an export a
client still uses waits for nbdkit to stop (SIGTERM, then SIGKILL), and
many of them must not hold the next heartbeat back past management's
unreachable threshold. A reply that arrives while the previous cleanup
still runs is skipped; the next one says the same again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_agent import capabilities
from node_agent.keys import write_private
from tessera.clients import ManagementClient
from tessera.errors import NotFound, TesseraError
from tessera.models import HeartbeatReply, PoolRegistration
from tessera.topology import TOPOLOGY_KEY

if TYPE_CHECKING:
    from node_agent.agent import Agent

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: a re-measured capacity is sent when it moved by more than this fraction
REPORT_TOLERANCE = 1 / 256
#: in the state directory: the epoch of the management database this node registered with
EPOCH_FILE = "management-epoch"


class Follower:
    """Applies a heartbeat reply to the agent: closes what management no longer wants."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.epoch_file: Path = agent.state_dir / EPOCH_FILE
        #: epochs already reported as foreign: one error per distinct epoch, not one per beat
        self._reported: set[str] = set()

    def mark(self) -> tuple[int, float]:
        """Taken just before the heartbeat is sent: what existed by then may be cleaned up."""
        return self.agent.exports.mark(), time.time()

    def follow(self, reply: HeartbeatReply, mark: tuple[int, float]) -> bool:
        """Close what the reply does not list; False (nothing closed) for a foreign database."""
        if not self.trusts(reply.epoch):
            return False
        export_mark, sent_at = mark
        # owner side: exports no attachment wants (each close is logged)
        self.agent.reap_exports({(e.volume_id, e.client_node) for e in reply.exports}, export_mark)
        # consumer side: remote volumes management no longer attaches here
        self.agent.forget_unwanted(set(reply.attachments), sent_at)
        return True

    def trusts(self, epoch: str) -> bool:
        """Whether a reply from the database `epoch` may close this node's exports and connections.

        The first epoch seen is persisted and trusted. An empty epoch (a
        management older than epochs) is trusted only while none is
        persisted, as before epochs existed; once one is, an empty epoch
        cannot prove it is the same database, so it counts as a mismatch.
        The file is read on every reply: deleting it takes effect at once.
        """
        epoch = epoch.strip()  # the file holds it stripped
        persisted = self.persisted_epoch()
        if persisted is None:
            if epoch:
                write_private(self.epoch_file, f"{epoch}\n".encode())
                self._reported.clear()  # a database left behind and met again is news again
                log.info("management's database epoch is %s (kept in %s)", epoch, self.epoch_file)
            return True
        if epoch == persisted:
            return True
        if epoch not in self._reported:
            self._reported.add(epoch)
            log.error(
                "management's database (epoch %s) is not the one this node registered with "
                "(epoch %s): exports and connections it does not list are kept; if the database "
                "was replaced on purpose, delete %s (the next heartbeat adopts the new one)",
                epoch or "none: an older management", persisted, self.epoch_file,
            )  # fmt: skip
        return False

    def persisted_epoch(self) -> str | None:
        """The epoch in the state directory; None when there is none (or the file is empty)."""
        try:
            text = self.epoch_file.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None


class Registrar:
    def __init__(
        self,
        client: ManagementClient,
        node_id: str,
        agent_url: str,
        capacities: Callable[[], dict[str, int]] | Callable[[], dict[str, PoolRegistration]],
        max_volumes: int = 0,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        follower: Follower | None = None,
        transports: list[str] | None = None,
    ) -> None:
        self.client = client
        #: what this host can serve and attach over (node_agent/capabilities.py); None: unsaid
        self.transports = transports
        #: whether it has the kernel nbd client; None: not probed yet (sent with transports)
        self.kernel_nbd: bool | None = None
        self.node_id = node_id
        self.agent_url = agent_url
        self.capacities = capacities
        self.max_volumes = max_volumes
        self.heartbeat_seconds = heartbeat_seconds
        self.follower = follower
        self.registered = threading.Event()
        #: what management last accepted, by pool
        self._reported: dict[str, PoolRegistration] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)
        #: the cleanup after the last reply (see the module's docstring); one at a time
        self._cleanup: threading.Thread | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.settle(timeout)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for the cleanup after the last reply; whether none is running any more."""
        cleanup = self._cleanup
        if cleanup is not None:
            cleanup.join(timeout)
            return not cleanup.is_alive()
        return True

    def register(self) -> None:
        """One full registration: the node, then each pool with its capacity."""
        topology = {TOPOLOGY_KEY: self.node_id}
        offered: dict[str, Any] = {}
        if self.transports is not None:  # an agent saying what its host can do
            # nbd legs of composed volumes need the kernel nbd client on the consumer
            offered = {"transports": self.transports, "kernel_nbd": self._kernel_nbd()}
        self.client.register_node(
            self.node_id, self.agent_url, topology, self.max_volumes, **offered
        )
        self._reported.clear()
        self.report_pools()
        self.registered.set()
        log.info("registered node %s (%s) with management", self.node_id, self.agent_url)

    def _kernel_nbd(self) -> bool:
        """Probed once (it logs why not): modules and tools do not come and go under us."""
        if self.kernel_nbd is None:
            self.kernel_nbd = capabilities.has_kernel_nbd()
        return self.kernel_nbd

    def report_pools(self) -> None:
        """Send each pool's report that differs from what management last accepted.

        `capacities` gives a bare capacity (tests, older callers) or the full
        report: capacity, physical use and snapshot method.
        """
        for pool, measured in self.capacities().items():
            now = (
                measured
                if isinstance(measured, PoolRegistration)
                else PoolRegistration(capacity_bytes=measured)
            )
            last = self._reported.get(pool)
            if last is None or _moved(last, now):
                self.client.register_pool(
                    self.node_id, pool, now.capacity_bytes, now.used_bytes, now.snapshot_method
                )
                self._reported[pool] = now

    def _run(self) -> None:
        while not self._stop.is_set():
            self._register_until_done()
            self._heartbeat_until_forgotten()

    def _register_until_done(self) -> None:
        delay = BACKOFF_START
        while not self._stop.is_set():
            try:
                self.register()
                return
            except TesseraError as err:
                log.warning("registration failed (%s); retrying in %.1fs", err, delay)
            except Exception:  # noqa: BLE001 - keep the thread alive whatever happens
                log.exception("registration failed; retrying in %.1fs", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _heartbeat_until_forgotten(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
            except NotFound:
                log.warning("management forgot node %s; registering again", self.node_id)
                self.registered.clear()
                return
            except TesseraError as err:
                log.warning("heartbeat failed: %s", err)
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")

    def beat(self) -> None:
        """One heartbeat: say alive, start following the answer, report changed capacities.

        Following runs in its own thread so that closing exports never
        delays the next beat (see the module's docstring).
        """
        mark = self.follower.mark() if self.follower is not None else None
        reply = self.client.heartbeat(self.node_id)
        if self.follower is not None and mark is not None:
            self._start_cleanup(self.follower, reply, mark)
        self.report_pools()

    def _start_cleanup(
        self, follower: Follower, reply: HeartbeatReply, mark: tuple[int, float]
    ) -> None:
        if self._cleanup is not None and self._cleanup.is_alive():
            log.debug("the cleanup after the previous heartbeat still runs; skipped this reply")
            return
        self._cleanup = threading.Thread(
            target=_follow, args=(follower, reply, mark), name="heartbeat-cleanup", daemon=True
        )
        self._cleanup.start()


def _moved(last: PoolRegistration, now: PoolRegistration) -> bool:
    """Whether a report differs enough from the last accepted one to send it again."""
    return (
        now.snapshot_method != last.snapshot_method
        or _beyond(last.capacity_bytes, now.capacity_bytes)
        or _beyond(last.used_bytes, now.used_bytes)
    )


def _beyond(last: int, now: int) -> bool:
    return abs(now - last) > max(now, last) * REPORT_TOLERANCE


def _follow(follower: Follower, reply: HeartbeatReply, mark: tuple[int, float]) -> None:
    try:
        follower.follow(reply, mark)
    except Exception:  # noqa: BLE001 - the next heartbeat's reply is followed again
        log.exception("cleaning up after the heartbeat reply failed")
