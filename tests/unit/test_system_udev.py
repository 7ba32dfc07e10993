"""Device waits are bounded, with or without a udev monitor (no root)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tessera.errors import Unavailable
from tessera.system import udev


def test_existing_device_returns_at_once(tmp_path: Path) -> None:
    (tmp_path / "loop9").touch()
    udev.wait_for_device(str(tmp_path / "loop9"), timeout=0.1)


@pytest.mark.parametrize("with_monitor", [True, False])
def test_missing_device_times_out_boundedly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_monitor: bool
) -> None:
    if not with_monitor:
        monkeypatch.setattr(udev, "_monitor", lambda: None)
    start = time.monotonic()
    with pytest.raises(Unavailable):
        udev.wait_for_device(str(tmp_path / "loop-never"), timeout=0.3)
    assert time.monotonic() - start < 2.5
