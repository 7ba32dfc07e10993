"""The one lock policy (tessera.locks): a busy volume answers "busy" at once, never queues."""

from __future__ import annotations

import threading

import pytest

from tessera.errors import Aborted
from tessera.locks import VolumeLocks


def test_a_second_operation_on_a_busy_volume_is_aborted_instead_of_queued() -> None:
    locks = VolumeLocks()
    with locks.hold("vol-a"), pytest.raises(Aborted, match="vol-a .*in progress"):
        with locks.hold("vol-a"):
            pass


def test_other_volumes_and_later_operations_are_not_blocked() -> None:
    locks = VolumeLocks()
    with locks.hold("vol-a"), locks.hold("vol-b"):
        pass
    with locks.hold("vol-a"):  # released after the first block, also on error
        pass
    with pytest.raises(RuntimeError), locks.hold("vol-a"):
        raise RuntimeError("work failed")
    with locks.hold("vol-a"):
        pass
    assert locks._held == set(), "the table holds only keys in use"


def test_concurrent_callers_never_run_one_volume_twice_at_once() -> None:
    locks = VolumeLocks()
    inside, peak, aborted = 0, 0, 0
    guard = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        nonlocal inside, peak, aborted
        start.wait()
        try:
            with locks.hold("vol-a"):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                threading.Event().wait(0.01)
                with guard:
                    inside -= 1
        except Aborted:
            with guard:
                aborted += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 1
    assert aborted >= 1
    assert locks._held == set()
