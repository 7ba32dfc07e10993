"""What both dev stacks do with their processes: start, probe, stop, write state."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import grpc

#: how long a process gets to stop on SIGTERM before SIGKILL
STOP_GRACE = 15.0


def spawn(
    module_args: list[str], log_file: Path, prefix: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """`[prefix...] python -m <module_args>`, output appended to log_file, no stdin.

    A new session: Ctrl-C in the terminal reaches `dev up`, which then
    stops the children in order instead of all at once. `prefix` runs it
    elsewhere (`nsenter --net=...`, which execs, so the pid is Python's).
    """
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", *module_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send `sig` and wait; SIGKILL after STOP_GRACE. Already gone is fine."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def ensure_token(path: Path) -> str:
    """The stack's bearer token, made once (0600) and kept across restarts."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def csi_ready(endpoint: str) -> bool:
    """The plugin's Probe says ready (a missing socket or any error: not yet)."""
    from csi_driver._gen import csi_pb2, csi_pb2_grpc

    if not Path(endpoint.removeprefix("unix://")).is_socket():
        return False
    with grpc.insecure_channel(endpoint) as channel:
        try:
            reply = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return not reply.HasField("ready") or reply.ready.value


def write_json(path: Path, data: object) -> None:
    """Replace path atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class StateDirBusy(RuntimeError):
    """Another `dev up` holds the state directory."""


def lock_state_dir(state_dir: Path) -> IO[bytes]:
    """An exclusive lock on DIR for a stack's lifetime (closing the file releases it).

    Without it a second `dev up` on the same directory, refused at start,
    would tear down the first one's pool and processes in its stop().
    The fd is not inherited (Python's default), so a leftover child never
    keeps the directory locked.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "lock", "wb")  # noqa: SIM115 - held until the stack stops
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StateDirBusy(f"another `tessera dev up` is running on {state_dir}") from None
    return lock
