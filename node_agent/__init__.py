"""Tessera node-agent: the per-node data plane.

Target role: pools (directories on local NVMe filesystems) hold volumes as
sparse files. Client role: attach a volume and hand back a stable block
device symlink, `/dev/tessera/<volume-id>`. The kernel (loop devices,
later NBD / NVMe-TCP connections) is the source of truth for what is
attached, so an agent restart re-adopts the data path instead of
disturbing it.
"""
