"""One process per unix socket: claim the path before serving on it.

Both the CSI plugin and the node-agent listen on a unix socket whose path
is fixed by configuration (kubelet's plugin directory, the agent's socket).
A path left by a process that died is a dead socket file and must be
replaced, or a crashed plugin never comes back; a path where another
instance is serving must be left alone, or starting a second copy by
mistake (a stuck rollout, a manual run) would unlink the first one's
socket and cut kubelet off from a plugin that is still running.

The difference is told the way a client would: connect(). A listener
answers; a dead socket file refuses (ECONNREFUSED).
"""

from __future__ import annotations

import errno
import socket
import stat
from pathlib import Path

#: how long to wait for a connect() that neither succeeds nor is refused
PROBE_TIMEOUT = 2.0


class SocketPathTaken(RuntimeError):
    """Something holds the path: a live server, or a file that is not a socket."""


def claim_socket_path(path: Path) -> None:
    """Make `path` free for bind(): remove a dead socket, refuse anything else.

    Raises SocketPathTaken when a process answers on the socket, when the
    path is not a socket (a regular file is never deleted), or when it
    cannot be told whether anyone answers.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathTaken(f"{path} exists and is not a socket; refusing to replace it")
    if serving(path):
        raise SocketPathTaken(
            f"another process is serving on {path}; stop it first "
            "(only one instance may serve a socket)"
        )
    path.unlink(missing_ok=True)


def serving(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise SocketPathTaken(f"cannot tell whether {path} is in use: {exc}") from exc
    finally:
        probe.close()
    return True
