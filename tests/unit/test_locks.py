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


def test_concurrent_callers_on_a_busy_volume_are_all_aborted_and_none_runs() -> None:
    """While one operation holds the volume, every other caller is refused at once.

    No timing: the main thread holds the lock for as long as the workers
    run, so each of them meets a busy volume whatever the scheduler does.
    """
    locks = VolumeLocks()
    ran: list[int] = []
    aborted: list[int] = []
    guard = threading.Lock()

    def work(n: int) -> None:
        try:
            with locks.hold("vol-a"):
                with guard:
                    ran.append(n)
        except Aborted:
            with guard:
                aborted.append(n)

    with locks.hold("vol-a"):
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ran == []
        assert sorted(aborted) == list(range(8))
    assert locks._held == set()
    work(8)  # released: the next caller runs
    assert ran == [8]
