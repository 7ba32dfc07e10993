"""The node-agent's data path as Prometheus gauges, looked at when scraped.

The kernel and /proc are the truth (loop devices bound, nbdkit and nbdfuse
alive): nothing is counted as it happens, so what an agent restart
re-adopted is counted like what it made itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_agent.agent import Agent
from tessera.errors import TesseraError

log = logging.getLogger(__name__)

NBDKIT_EXPORT = "nbdkit_export"
NBD_CLIENT = "nbd_client"


class DataPathCollector(Collector):
    """tessera_datapath_processes{kind,healthy} and tessera_attachments_local{transport}."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        try:
            attachments = self.agent.list_attachments()
            exports = self.agent.exports.liveness()
        except (TesseraError, OSError) as exc:
            log.warning("metrics: cannot look at the data path: %s", exc)
            return
        processes: Counter[tuple[str, bool]] = Counter((NBDKIT_EXPORT, alive) for alive in exports)
        local: Counter[str] = Counter()
        for att in attachments:
            local[att.transport] += 1
            if att.transport == "nbd":
                # an nbd attachment's condition is non-empty when its client is gone
                processes[(NBD_CLIENT, not att.condition)] += 1
        yield _processes(processes)
        yield _attachments(local, sorted(self.agent.transports))


def _processes(counts: Counter[tuple[str, bool]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "tessera_datapath_processes",
        "Data-path processes this node should run: NBD exports (nbdkit, owner side) and NBD "
        "clients (nbdfuse, or the kernel nbd client and its TLS bridge; consumer side), by "
        "whether they are alive",
        labels=["kind", "healthy"],
    )
    for kind in (NBDKIT_EXPORT, NBD_CLIENT):
        for healthy in (True, False):
            family.add_metric([kind, str(healthy).lower()], counts[(kind, healthy)])
    return family


def _attachments(counts: Counter[str], transports: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "tessera_attachments_local",
        "Volumes attached on this node (a /dev/tessera device), by transport",
        labels=["transport"],
    )
    for transport in sorted({*transports, *counts}):
        family.add_metric([transport], counts[transport])
    return family
