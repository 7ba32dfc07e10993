"""A node's liveness as management sees it: online, unreachable or fenced.

An agent heartbeats every `--heartbeat-interval` seconds; a node that missed
`--heartbeat-misses` beats in a row is `unreachable`. Unreachable is only
an observation: the node may still be running and writing (a partition,
a stuck agent), so its attachments hold and single-writer volumes stay
blocked until someone fences it. `fenced` is a decision (an admin, or
ControllerUnpublish for that node after Kubernetes' out-of-service taint):
its attachments are released once the owners closed its exports. Fencing is
sticky: a fenced node that beats again stays fenced (the heartbeat reply
tells it to clean up everything) until an admin unfences it, because a node
that comes back may still have a pod writing to a local volume. See
docs/liveness.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from management.context import Context
from tessera.errors import Unavailable
from tessera.models import NodeState


class NodeLike(Protocol):
    """What liveness needs of a node: an ORM row or a Core row."""

    id: str
    last_heartbeat: float
    fenced_at: float


def node_state(ctx: Context, node: NodeLike) -> NodeState:
    if node.fenced_at:
        return NodeState.FENCED
    if node.last_heartbeat < ctx.online_since():
        return NodeState.UNREACHABLE
    return NodeState.ONLINE


def last_seen(ctx: Context, node: NodeLike) -> str:
    """`last heartbeat 2026-12-02T01:02:03Z, 45 s ago`, for messages a person acts on."""
    if not node.last_heartbeat:
        return "no heartbeat ever"
    when = datetime.fromtimestamp(node.last_heartbeat, UTC)
    ago = max(ctx.clock() - node.last_heartbeat, 0.0)
    return f"last heartbeat {when.strftime('%Y-%m-%dT%H:%M:%SZ')}, {ago:.0f} s ago"


def describe(ctx: Context, node: NodeLike, role: str = "node") -> str:
    """`node n2 is unreachable (last heartbeat …)`; empty when the node is online."""
    state = node_state(ctx, node)
    if state == NodeState.ONLINE:
        return ""
    return f"{role} {node.id} is {state.value} ({last_seen(ctx, node)})"


def require_online(ctx: Context, node: NodeLike, role: str, why: str) -> None:
    """Unavailable (503, CSI UNAVAILABLE: retried) unless the node heartbeats."""
    problem = describe(ctx, node, role)
    if not problem:
        return
    if node.fenced_at:
        why += (
            f"; it stays fenced until an admin lifts it once it was repaired "
            f"(tessera node unfence {node.id})"
        )
    raise Unavailable(f"{problem}: {why}", field="node_id")
