"""Topology segment keys: how a node names itself to the CO and to placement."""

#: Every Tessera node reports this key with its node id (NodeGetInfo, registration).
TOPOLOGY_KEY = "topology.tessera.io/node"
#: The node's zone label, reported alongside when the node has one.
ZONE_KEY = "topology.kubernetes.io/zone"
