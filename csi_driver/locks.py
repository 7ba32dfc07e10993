"""Per-volume operation locks.

The CSI spec asks a plugin to answer ABORTED when an operation is already
in progress for the same volume, rather than queueing it: the caller (a
sidecar or kubelet) retries with backoff anyway, and queueing would let
stale requests pile up behind a slow one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tessera.errors import Aborted


class VolumeLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock for `key`, or raise Aborted if someone else does."""
        with self._guard:
            if key in self._held:
                raise Aborted(f"an operation on {key} is already in progress; retry later")
            self._held.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(key)
