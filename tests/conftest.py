"""Test-wide fixtures: root detection and leak checks."""

from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: creates loop devices, filesystems and mounts"
)
