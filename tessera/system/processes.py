"""Data-path processes (nbdkit, nbdfuse) that outlive the agent which started them.

They run in their own session, so a restart (or a crash) of the agent
never takes live I/O with it, and the agent finds them again from pid
files. A pid alone proves nothing after a reboot or a wrap-around: it is
trusted only while /proc/<pid>/cmdline is still the command we started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal, Unavailable

#: how long a process gets to exit on SIGTERM before SIGKILL
TERMINATE_GRACE = 5.0


def cmdline(pid: int) -> list[str] | None:
    """The process's argument list, or None when there is no such process (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def matching(predicate: Callable[[list[str]], bool]) -> list[int]:
    """Pids (never our own) whose argument list satisfies `predicate`, in pid order.

    For what no pid file can be trusted to find: a process that started
    but never wrote one, or a whole stack's leftovers after a crash.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            args = cmdline(int(entry))
            if args and predicate(args):
                found.append(int(entry))
    return sorted(found)


#: /proc/net/tcp's state column for a connection that is up
TCP_ESTABLISHED = "01"


def established_tcp(pid: int) -> int:
    """How many of the process's sockets are TCP connections that are up (/proc: the
    socket inodes among its fds, looked up in its network namespace's tcp tables).

    A peer that reset or closed the connection leaves none: how the kernel nbd
    client's bridge tells a dead owner from a quiet one. 0 for a process that is gone.
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        return 0
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_ESTABLISHED and fields[9] in inodes:
                count += 1
    return count


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def running(pid_file: Path, program: str, markers: Sequence[str]) -> int | None:
    """The pid in `pid_file` when that process is `program` and its arguments hold every marker."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    args = cmdline(pid)
    if not args or os.path.basename(args[0]) != program:
        return None
    return pid if all(m in args for m in markers) else None


def children(pid: int) -> list[int]:
    """The process's children now (every thread's), from /proc; none when it is gone."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def start_detached(argv: Sequence[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, output appended to `log_file`, no stdin.

    The returned Popen may be dropped: the subprocess module reaps it later.
    """
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def terminate(pid: int, program: str, grace: float = TERMINATE_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace`; only while `pid` is still `program`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not _is(pid, program):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _is(pid, program):
            time.sleep(0.02)


def _is(pid: int, program: str) -> bool:
    args = cmdline(pid)
    return bool(args) and os.path.basename(args[0]) == program  # type: ignore[index]


def log_tail(log_file: Path, lines: int = 5) -> str:
    """The last lines of a process log, for an error message (they never hold keys)."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def run_tool(argv: Sequence[str], what: str, timeout: float) -> str:
    """Run an administration tool (mdadm, dmsetup...) to completion; its stdout.

    Errors say `what` was being done: the tool missing is FailedPrecondition
    (install it on the node), no answer in `timeout` is Unavailable (retry),
    a failure is Internal carrying the tool's own words.
    """
    tool = os.path.basename(argv[0])
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{what}: {tool} is not installed on this node") from exc
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{what}: {tool} did not answer within {timeout:.0f}s") from exc
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).replace("\n", "; ")
        raise Internal(f"{what} failed: {detail or f'{tool} exited {done.returncode}'}")
    return done.stdout
