"""Hosts on one machine: a network namespace per node, veths to one bridge.

Every name and the subnet derive from the state directory, so two stacks
(two developers, two tests running at once) never share a namespace, an
interface or an address range:

    bridge        tsb-<tag>            in the root namespace, <subnet>.1
    node K        tessera-<tag>-nK     a network namespace
    its link      tsv-<tag>-K          root side, enslaved to the bridge;
                  eth0                 the peer, inside the node's namespace,
                                       <subnet>.(K+1)

`tag` is the first 6 hex digits of sha256(resolved state dir). Interface
names stay within the kernel's 15 characters (IFNAMSIZ - 1) up to node 9999.

Processes enter a node with `nsenter --net` (the network namespace only),
not `ip netns exec`: that one also unshares the mount namespace and makes
it a slave, so a mount made by the agent or the CSI plugin inside (a FUSE
export, a staged filesystem) would be invisible to the other processes of
the same node, to the tests and to the teardown.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
#: where dev subnets are taken from: 10.200.0.0 - 10.249.255.0, a /24 each
SUBNET_BASE = ipaddress.IPv4Address("10.200.0.0")
SUBNET_SLOTS = 50 * 256
#: addresses .2 .. .251 of a /24 (.1 is the bridge)
MAX_NODES = 250
COMMAND_TIMEOUT = 30


class NetworkError(RuntimeError):
    """An `ip` command failed; the message has its stderr (never a secret: no keys here)."""


@dataclass(frozen=True)
class Network:
    tag: str
    subnet: ipaddress.IPv4Network

    @property
    def bridge(self) -> str:
        return f"tsb-{self.tag}"

    @property
    def bridge_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def netns(self, index: int) -> str:
        return f"tessera-{self.tag}-n{index}"

    def veth(self, index: int) -> str:
        return f"tsv-{self.tag}-{index}"

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + 1 + index)

    def to_json(self) -> dict[str, str]:
        return {"tag": self.tag, "subnet": str(self.subnet)}


def tag_of(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


def network_for(state_dir: Path) -> Network:
    """The state dir's network: the one it used before, else a free /24 derived from it.

    The subnet is recorded in `network.json` so a restart uses the same
    addresses while it is free; a derived one that overlaps an address or
    route already on this machine moves to the next free slot.
    """
    tag = tag_of(state_dir)
    record = state_dir / "network.json"
    taken = _networks_in_use()
    if record.exists():
        data = json.loads(record.read_text())
        subnet = ipaddress.IPv4Network(data["subnet"])
        # Called once this DIR's own bridge is gone: an overlap is someone else's now.
        if data.get("tag") == tag and not any(subnet.overlaps(net) for net in taken):
            return Network(tag, subnet)
    first = int(tag, 16) % SUBNET_SLOTS
    for step in range(SUBNET_SLOTS):
        slot = (first + step) % SUBNET_SLOTS
        subnet = ipaddress.IPv4Network((int(SUBNET_BASE) + slot * 256, 24))
        if not any(subnet.overlaps(net) for net in taken):
            network = Network(tag, subnet)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(network.to_json()) + "\n")
            tmp.replace(record)
            return network
    raise NetworkError("no free /24 left in 10.200.0.0/16-10.249.0.0/16 for a dev network")


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in (root namespace)."""
    found = []
    for entry in json.loads(ip("-j", "-4", "addr", "show") or "[]"):
        for info in entry.get("addr_info", []):
            found.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", False))
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and route.get("type", "unicast") == "unicast":
            found.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", False))
    return found


# ---- commands -------------------------------------------------------------------


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout. Failure raises NetworkError with what `ip` said."""
    return run(["ip", *args])


def run(argv: Sequence[str]) -> str:
    res = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if res.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res.stdout


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside `netns`: its network only (the module docstring says why)."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]


# ---- up and down ------------------------------------------------------------------


def create(network: Network, nodes: int) -> None:
    """The bridge, then each node's namespace and link; raises on the first failure.

    The caller tears down (`destroy`) whatever was made before a failure.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise NetworkError(f"between 1 and {MAX_NODES} nodes fit one dev network, not {nodes}")
    ip("link", "add", network.bridge, "type", "bridge")
    ip("addr", "add", f"{network.bridge_address}/{network.subnet.prefixlen}", "dev", network.bridge)
    ip("link", "set", network.bridge, "up")
    for index in range(1, nodes + 1):
        add_node(network, index)


def add_node(network: Network, index: int) -> None:
    netns = network.netns(index)
    ip("netns", "add", netns)
    ip("link", "add", network.veth(index), "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("link", "set", network.veth(index), "master", network.bridge, "up")
    inside = ("ip", "-n", netns)
    run([*inside, "addr", "add", f"{network.address(index)}/{network.subnet.prefixlen}", "dev",
         "eth0"])  # fmt: skip
    run([*inside, "link", "set", "eth0", "up"])
    run([*inside, "link", "set", "lo", "up"])


def set_link(network: Network, index: int, up: bool) -> None:
    """The node's cable: its root-side veth down cuts it off the bridge (both ways)."""
    ip("link", "set", network.veth(index), "up" if up else "down")


def namespaces(tag: str) -> list[str]:
    """The namespaces of the network `tag` that exist now (also a crashed earlier run's)."""
    prefix = f"tessera-{tag}-n"
    if not NETNS_DIR.is_dir():
        return []
    return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))


def links(tag: str) -> list[str]:
    """The network `tag`'s interfaces in the root namespace: the bridge and the veths."""
    names = [entry["ifname"] for entry in json.loads(ip("-j", "link", "show") or "[]")]
    return [n for n in names if n == f"tsb-{tag}" or n.startswith(f"tsv-{tag}-")]


def pids_in(netns: str) -> list[int]:
    """Every process in that namespace (whoever started it)."""
    try:
        out = ip("netns", "pids", netns)
    except NetworkError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def destroy(tag: str) -> list[str]:
    """Remove the veths, the bridge and the namespaces; what could not be removed.

    Idempotent and complete whatever state a failed start left; the
    processes inside must be gone first (a namespace with a process in it
    lives on after `ip netns del`).
    """
    problems = []
    for name in sorted(links(tag), key=lambda n: n.startswith("tsb-")):
        problems += _attempt("link", "del", name)
    for netns in namespaces(tag):
        problems += _attempt("netns", "del", netns)
    return problems


def _attempt(*args: str) -> list[str]:
    try:
        ip(*args)
    except NetworkError as exc:
        return [str(exc)]
    return []
