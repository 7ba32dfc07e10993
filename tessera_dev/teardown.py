"""Leave nothing of a multi-node dev stack behind: processes, mounts, devices.

Everything here is found from the machine's own state (process command
lines, pid files, sysfs, the mount table), never from the stack object's
memory, so it cleans up as well after a failed start or a crashed
`dev up` as after a clean stop. Only what points into the state
directory is touched.

Order matters: the filesystems on our loop devices are unmounted and the
devices detached before their NBD clients (nbdfuse) go, or the kernel
would see I/O errors on a live filesystem; FUSE mounts go before the
owner-side exports (nbdkit) they read from; the pools go last.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tessera.errors import TesseraError
from tessera.system import loopdev, mounts, processes

#: data-path programs the node-agents start detached (own session)
DATA_PATH = ("nbdfuse", "nbdkit")
#: our own Python processes, by their `-m` module
MODULES = ("csi_driver", "node_agent", "management")


def stack_processes(state_dir: Path, programs: tuple[str, ...]) -> list[int]:
    """Pids of `programs` whose command line names a path inside `state_dir`.

    A Python process counts by its `-m` module; anything else by its program
    name. Our own pid is never among them.
    """
    root = str(state_dir.resolve()) + os.sep
    return processes.matching(
        lambda args: _program(args) in programs and any(root in a for a in args[1:])
    )


def _program(args: list[str]) -> str:
    if len(args) >= 3 and args[1] == "-m" and os.path.basename(args[0]).startswith("python"):
        return args[2]
    return os.path.basename(args[0])


def pid_file_processes(state_dir: Path) -> list[int]:
    """Pids in pid files under the nodes' state dirs that are still a data-path program."""
    found = []
    for pid_file in state_dir.glob("nodes/*/state/**/*.pid"):
        pid = processes.read_pid(pid_file)
        args = processes.cmdline(pid) if pid else None
        if pid and args and _program(args) in DATA_PATH:
            found.append(pid)
    return found


def kill_stack_processes(state_dir: Path, programs: tuple[str, ...] = MODULES) -> None:
    """SIGTERM (then SIGKILL) every leftover process of ours, e.g. after `dev up` was killed."""
    for pid in stack_processes(state_dir, programs):
        args = processes.cmdline(pid)
        if args:
            processes.terminate(pid, os.path.basename(args[0]))


def release_data_path(state_dir: Path, keep: set[str]) -> list[str]:
    """Unmount, detach and stop everything under state_dir except the `keep` images.

    Returns what could not be released (for the caller to report).
    """
    problems = _release_loops(state_dir, keep)
    _stop(state_dir, "nbdfuse")
    problems += _unmount_fuse(state_dir)
    _stop(state_dir, "nbdkit")
    return problems


def _release_loops(state_dir: Path, keep: set[str]) -> list[str]:
    loops = [b for b in loopdev.bound_under(state_dir) if b.backing not in keep]
    problems = []
    for mountpoint in reversed(mounts.mounts_of_devices([b.path for b in loops])):
        try:
            mounts.unmount(mountpoint)
        except TesseraError as exc:
            problems.append(str(exc))
    for bound in loops:
        try:
            loopdev.detach(bound.path)
        except (OSError, TesseraError) as exc:
            problems.append(f"cannot detach {bound.path} ({bound.backing}): {exc}")
    return problems


def _stop(state_dir: Path, program: str) -> None:
    pids = set(stack_processes(state_dir, (program,)))
    pids |= {p for p in pid_file_processes(state_dir) if _is(p, program)}
    for pid in pids:
        processes.terminate(pid, program)


def _is(pid: int, program: str) -> bool:
    args = processes.cmdline(pid)
    return bool(args) and _program(args) == program  # type: ignore[arg-type]


def _unmount_fuse(state_dir: Path) -> list[str]:
    """FUSE mounts left under state_dir (an nbdfuse that died without unmounting)."""
    problems = []
    fuse = {m.mountpoint for m in mounts.mount_table() if m.fs_type.startswith("fuse")}
    for mountpoint in reversed(mounts.mounts_under(state_dir)):
        if mountpoint in fuse:
            try:
                mounts.unmount(mountpoint)
            except TesseraError as exc:
                problems.append(str(exc))
    return problems


def remove_device_links(state_dir: Path) -> None:
    """The nodes' /dev/tessera links: once every device is detached they point at nothing.

    Symlinks only; a restarted agent makes them again when it attaches.
    """
    for link in state_dir.glob("nodes/*/dev/*"):
        if link.is_symlink():
            link.unlink()


def kill_all(pids: list[int]) -> None:
    """SIGKILL what is still inside our namespaces after the orderly stop."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
