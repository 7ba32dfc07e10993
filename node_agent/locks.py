"""Per-volume locks: concurrent requests for one volume run one at a time.

kubelet, the sidecars and management all retry, so two requests for the
same volume can arrive together; serializing them keeps "look, then act"
sequences (find device, attach, symlink) consistent. Different volumes
never wait for each other. Entries are reference-counted so the table
does not grow with every volume ever seen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tessera.errors import Aborted

DEFAULT_WAIT = 120.0


class VolumeLocks:
    def __init__(self, wait_seconds: float = DEFAULT_WAIT) -> None:
        self._wait = wait_seconds
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, volume_id: str) -> Iterator[None]:
        """Hold the volume's lock; Aborted if another operation runs too long."""
        lock = self._ref(volume_id)
        try:
            if not lock.acquire(timeout=self._wait):
                raise Aborted(f"another operation on volume {volume_id} is in progress")
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(volume_id)

    def _ref(self, volume_id: str) -> threading.Lock:
        with self._guard:
            lock, count = self._locks.get(volume_id, (threading.Lock(), 0))
            self._locks[volume_id] = (lock, count + 1)
            return lock

    def _unref(self, volume_id: str) -> None:
        with self._guard:
            lock, count = self._locks[volume_id]
            if count <= 1:
                del self._locks[volume_id]
            else:
                self._locks[volume_id] = (lock, count - 1)
