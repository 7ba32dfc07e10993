"""What every request handler needs, built once per app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from management.agents import AgentClients
from management.db import Database

DEFAULT_HEARTBEAT_TIMEOUT = 30.0


@dataclass
class Context:
    db: Database
    agents: AgentClients
    #: a node is online when its last heartbeat is at most this many seconds old
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    clock: Callable[[], float] = field(default=time.time)

    def online_since(self) -> float:
        """Oldest heartbeat that still counts as online."""
        return self.clock() - self.heartbeat_timeout
