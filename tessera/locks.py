"""Per-volume operation locks, one policy for every process: busy answers at once.

Two requests for the same volume can arrive together (kubelet, the CSI
sidecars and management all retry). Serializing them keeps "look, then
act" sequences (find device, attach, symlink) consistent; the second one
is refused with `Aborted` (ABORTED over CSI, 409 problem type `aborted`
over REST) instead of waiting for the first:

- the CSI spec asks a plugin to answer ABORTED when an operation for the
  volume is already in progress, and every caller retries with backoff;
- a waiting request holds a server worker thread, and waiting longer than
  the caller's read timeout (tessera.http.READ_TIMEOUT) means the caller
  reports "outcome unknown" while the queued operation still runs later,
  behind its back.

Different keys never wait for each other. The table holds only keys in use.
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
        """Hold the lock for `key`, or raise Aborted at once if someone else does."""
        with self._guard:
            if key in self._held:
                raise Aborted(f"an operation on {key} is already in progress; retry later")
            self._held.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(key)
