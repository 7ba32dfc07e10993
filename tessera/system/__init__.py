"""Node-side system code: the one home of everything that touches the host.

Mount table reading and mount/unmount (`mounts`), filesystem probing and
making (`filesystems`), loop devices (`loopdev`), facts about block devices
and whether one is in use (`blockdev`), waiting for device nodes (`udev`),
and the raw system calls beneath them (`syscalls`); reflink copies and
the sparse copy fallback (`reflink`), extent maps (`fiemap`) and
filesystem freezes (`freeze`) for snapshots. The CSI node service,
the node-agent and the dev tools all use these modules and nothing else for
this work, so each rule (compare devices by number, never unmount lazily,
never format a device with a signature) is written once. Every transport
(loop today, NBD and NVMe/TCP next) builds on them.
"""
