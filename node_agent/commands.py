"""Running system tools: argument lists only, always with a timeout.

One place so every call gets the same treatment: no shell, bounded time,
and a failure turned into a `tessera.errors` type a client can act on.
"""

from __future__ import annotations

import logging
import subprocess

from tessera.errors import Internal, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


def run(
    args: list[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; raise Internal on a non-zero exit when `check` is set.

    A timeout becomes Unavailable: the kernel or a tool was slow, and the
    caller (kubelet, management) retrying later is the right reaction.
    """
    log.debug("running %s", args)
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{args[0]} did not finish within {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise Internal(f"{args[0]} is not installed on this node") from exc
    if check and res.returncode != 0:
        raise Internal(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res
