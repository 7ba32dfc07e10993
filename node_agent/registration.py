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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tessera.clients import ManagementClient
from tessera.errors import NotFound, TesseraError
from tessera.topology import TOPOLOGY_KEY

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: a re-measured capacity is sent when it moved by more than this fraction
REPORT_TOLERANCE = 1 / 256


class Registrar:
    def __init__(
        self,
        client: ManagementClient,
        node_id: str,
        agent_url: str,
        capacities: Callable[[], dict[str, int]],
        max_volumes: int = 0,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.agent_url = agent_url
        self.capacities = capacities
        self.max_volumes = max_volumes
        self.heartbeat_seconds = heartbeat_seconds
        self.registered = threading.Event()
        #: capacity last accepted by management, by pool
        self._reported: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def register(self) -> None:
        """One full registration: the node, then each pool with its capacity."""
        topology = {TOPOLOGY_KEY: self.node_id}
        self.client.register_node(self.node_id, self.agent_url, topology, self.max_volumes)
        self._reported.clear()
        self.report_pools()
        self.registered.set()
        log.info("registered node %s (%s) with management", self.node_id, self.agent_url)

    def report_pools(self) -> None:
        """Send each pool's capacity that differs from what management last accepted."""
        for pool, capacity in self.capacities().items():
            last = self._reported.get(pool)
            if last is None or abs(capacity - last) > max(capacity, last) * REPORT_TOLERANCE:
                self.client.register_pool(self.node_id, pool, capacity)
                self._reported[pool] = capacity

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
                self.client.heartbeat(self.node_id)
                self.report_pools()
            except NotFound:
                log.warning("management forgot node %s; registering again", self.node_id)
                self.registered.clear()
                return
            except TesseraError as err:
                log.warning("heartbeat failed: %s", err)
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
