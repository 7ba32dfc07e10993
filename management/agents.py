"""Cached clients for node-agents.

One `AgentClient` (and so one thread-safe pool of keep-alive connections) per agent
URL for the life of the process: opening a connection per request would
dominate the latency of volume create.
"""

from __future__ import annotations

import threading

from tessera.clients import AgentClient


class AgentClients:
    def __init__(self, token: str, ca_file: str | None = None) -> None:
        self._token = token
        #: CA bundle that signed the agents' https certificates (None: the system's)
        self._ca_file = ca_file
        self._clients: dict[str, AgentClient] = {}
        self._lock = threading.Lock()

    def get(self, agent_url: str) -> AgentClient:
        client = self._clients.get(agent_url)
        if client is not None:
            return client
        with self._lock:
            client = self._clients.get(agent_url)
            if client is None:
                client = AgentClient(agent_url, self._token, ca_file=self._ca_file)
                self._clients[agent_url] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
