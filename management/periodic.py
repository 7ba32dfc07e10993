"""A daemon thread that runs one round every `interval` seconds until stopped.

Management's background loops (`--reconcile-interval`, `--auto-repair`) differ
only in what a round does; the thread, its start and its bounded stop live here
once. A round must catch its own errors: what a failure means (and how loud it
is) is the loop's business, and one bad round must not end the loop.
"""

from __future__ import annotations

import threading

from management.context import Context


class PeriodicLoop:
    """Call `round()` every `interval` seconds on a daemon thread named `thread_name`."""

    thread_name = "periodic"

    def __init__(self, ctx: Context, interval: float) -> None:
        if interval <= 0:  # wait(0) would spin a core
            raise ValueError(f"the {self.thread_name} interval must be positive")
        self.ctx = ctx
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def round(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.round()
