"""Topology: how a node names itself to the CO, and which nodes a volume may go on."""

from __future__ import annotations

from collections.abc import Sequence

from tessera.errors import InvalidArgument
from tessera.models import Locality

#: Every Tessera node reports this key with its node id (NodeGetInfo, registration).
TOPOLOGY_KEY = "topology.tessera.io/node"
#: The node's zone label, reported alongside when the node has one.
ZONE_KEY = "topology.kubernetes.io/zone"


def candidate_nodes(
    locality: Locality,
    requisite: Sequence[str],
    preferred: Sequence[str],
    fields: tuple[str, str] = ("requisite_nodes", "preferred_nodes"),
) -> list[str] | None:
    """The nodes a volume may go on; None means any node.

    Always within `requisite` when it is given (the CO computed it from the
    PVC's and the StorageClass's topology; leaving it would give a pod a
    volume it cannot reach). `required` with a consumer (the first preferred
    node, which is the scheduled pod's node under WaitForFirstConsumer)
    narrows that to exactly the consumer; a consumer outside `requisite` is
    a contradiction the caller must fix, not something to guess around.
    Management places by it, and the CSI controller asks it first so the
    same rule answers in the CO's own field names.
    """
    nodes = list(dict.fromkeys(requisite))
    if locality == Locality.REQUIRED and preferred:
        consumer = preferred[0]
        if nodes and consumer not in nodes:
            raise InvalidArgument(
                f"locality=required: the consumer node {consumer!r} (first of {fields[1]}) "
                f"is not one of {fields[0]}",
                field=fields[1],
            )
        return [consumer]
    return nodes or None
