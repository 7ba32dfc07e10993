"""What every request handler needs, built once per app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from management.agents import AgentClients
from management.db import Database

#: seconds between two heartbeats of an agent (node_agent.registration beats every 10 s)
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: beats a node may miss before it is unreachable
DEFAULT_HEARTBEAT_MISSES = 3


@dataclass
class Context:
    db: Database
    agents: AgentClients
    #: how often the agents beat (management's --heartbeat-interval)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    #: a node is unreachable after this many intervals without a beat
    heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES
    clock: Callable[[], float] = field(default=time.time)

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds without a heartbeat after which a node is unreachable."""
        return self.heartbeat_interval * self.heartbeat_misses

    def online_since(self) -> float:
        """Oldest heartbeat that still counts as online."""
        return self.clock() - self.heartbeat_timeout
