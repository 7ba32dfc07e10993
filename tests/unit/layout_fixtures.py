"""A management app with several nodes, each served by its own (real-file) FakeAgent.

Legs of one volume are on distinct nodes and share the volume's file name,
so each node needs its own agent root: one agent serving several nodes
(tests.unit.management_fixtures.cluster) would hold them in one directory.
Management's clock is injected (`now`), so a node goes unreachable
without sleeping.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from management.app import create_app
from tests.unit.management_fixtures import TOKEN, FakeAgent, GiB, served_agent

ZONE = "topology.kubernetes.io/zone"


@dataclass
class Nodes:
    api: TestClient
    agents: dict[str, FakeAgent]
    now: list[float]

    @property
    def ctx(self):  # noqa: ANN201 - management.context.Context
        return self.api.app.state.ctx  # type: ignore[attr-defined]

    def add(
        self,
        node_id: str,
        *,
        zone: str = "",
        capacity: int = 10 * GiB,
        transports: list[str] | None = None,
        kernel_nbd: bool | None = None,
    ) -> None:
        body: dict[str, object] = {
            "agent_url": self.agents[node_id].url,
            "topology": {ZONE: zone} if zone else {},
        }
        if transports is not None:
            body["transports"] = transports
        if kernel_nbd is not None:
            body["kernel_nbd"] = kernel_nbd
        assert self.api.put(f"/v1/nodes/{node_id}", json=body).status_code == 200
        resp = self.api.put(f"/v1/nodes/{node_id}/pools/p", json={"capacity_bytes": capacity})
        assert resp.status_code == 200, resp.text

    def vpg(self, name: str, layout: str, legs: int = 0, chunk: int = 0) -> None:
        body = {"name": name, "layout": layout, "legs": legs, "chunk_bytes": chunk}
        resp = self.api.post("/v1/vpgs", json=body)
        assert resp.status_code in (200, 201), resp.text

    def create(self, name: str, size: int, vpg: str, **extra: object):  # noqa: ANN201
        body = {"name": name, "size_bytes": size, "vpg": vpg, **extra}
        return self.api.post("/v1/volumes", json=body)

    def pass_time(self, seconds: float, *still_beating: str) -> None:
        """Time passes; only `still_beating` nodes heartbeat meanwhile."""
        self.now[0] += seconds
        self.beat(*still_beating)

    def beat(self, *nodes: str) -> None:
        for node in nodes:
            resp = self.api.post(f"/v1/nodes/{node}/heartbeat")
            assert resp.status_code == 200, resp.text

    def file(self, node: str, volume_id: str) -> Path | None:
        return self.agents[node].find(volume_id)

    def pool(self, node: str) -> dict:
        pools = self.api.get("/v1/pools").json()["items"]
        return next(p for p in pools if p["node_id"] == node)


def running_nodes(db_url: str, tmp_path: Path, names: tuple[str, ...]) -> Iterator[Nodes]:
    now = [1_000_000.0]
    sock_dir = Path(tempfile.mkdtemp(prefix="tsl-"))
    try:
        with ExitStack() as stack:
            agents = {
                name: stack.enter_context(
                    served_agent(
                        FakeAgent(
                            root=tmp_path / name, socket=sock_dir / f"{name}.sock", node_id=name
                        )
                    )
                )
                for name in names
            }
            app = create_app(db_url, TOKEN)
            with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
                app.state.ctx.clock = lambda: now[0]
                yield Nodes(api=api, agents=agents, now=now)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def nodes(db_url: str, tmp_path: Path) -> Iterator[Nodes]:
    """Five nodes n1..n5 with agents; none registered yet (tests add them with zones)."""
    yield from running_nodes(db_url, tmp_path, ("n1", "n2", "n3", "n4", "n5"))
