"""The agent's capacity options: reserve arithmetic, overcommit parsing (no root)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from node_agent.__main__ import open_pools, parse_args
from node_agent.pools import MiB, Pool, Reserve, parse_overcommit
from tessera.errors import InvalidArgument


def test_reserve_is_a_percentage_with_a_floor_for_small_pools() -> None:
    reserve = Reserve(percent=2.0, minimum_bytes=64 * MiB)
    assert reserve.bytes_for(1024 * MiB) == 64 * MiB  # 2% would be 20 MiB: too little
    assert reserve.bytes_for(100 * 1024 * MiB) == math.ceil(100 * 1024 * MiB * 0.02)


@pytest.mark.parametrize("percent,minimum", [(-1.0, 0), (100.0, 0), (1.0, -1)])
def test_impossible_reserves_are_refused(percent: float, minimum: int) -> None:
    with pytest.raises(InvalidArgument):
        Reserve(percent, minimum)


@pytest.mark.parametrize("ratio", [0.5, 0.0, -2.0, math.nan, math.inf])
def test_an_overcommit_ratio_below_one_or_not_a_number_is_refused(
    tmp_path: Path, ratio: float
) -> None:
    with pytest.raises(InvalidArgument) as info:
        Pool.open("p", tmp_path, overcommit_ratio=ratio)
    assert info.value.field == "overcommit"


@pytest.mark.parametrize("spec", ["fast", "fast=", "=2", "fast=lots"])
def test_malformed_overcommit_options_are_refused_naming_the_option(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="--overcommit"):
        parse_overcommit([spec])


def agent_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--node-id", "n", "--management", "unix:///x.sock", "--token-file", "t",
        "--socket", "s", "--pool", f"fast={tmp_path}", *extra,
    ]  # fmt: skip


def test_agent_options_reach_the_pool(tmp_path: Path) -> None:
    args = agent_args(
        tmp_path, "--capacity-reserve", "5", "--capacity-reserve-min", "1GiB",
        "--overcommit", "fast=1.5",
    )  # fmt: skip
    pool = open_pools(parse_args(args))["fast"]
    assert pool.reserve == Reserve(5.0, 1024 * MiB)
    assert pool.overcommit_ratio == 1.5


def test_overcommit_for_a_pool_the_agent_does_not_serve_stops_the_agent(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="slow"):
        open_pools(parse_args(agent_args(tmp_path, "--overcommit", "slow=2")))


def test_capacity_never_counts_the_reserve_or_goes_negative(tmp_path: Path) -> None:
    huge = Reserve(percent=99.0, minimum_bytes=0)
    assert Pool.open("p", tmp_path, reserve=huge).capacity_bytes() == 0
    capacity = Pool.open("p", tmp_path).capacity_bytes()
    assert capacity % MiB == 0 and capacity > 0
