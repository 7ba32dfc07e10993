"""Property-based: whatever the pools, placement never puts two legs on one node or a leg
where it does not fit, prefers unused zones, and refuses exactly when it must."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from management.placement import PoolSpace, place_legs
from tessera.errors import OutOfRange, ResourceExhausted

MiB = 1024**2


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[PoolSpace], dict[str, str]]:
    n_nodes = draw(st.integers(1, 8))
    pools, zones = [], {}
    for i in range(n_nodes):
        node = f"n{i}"
        zone = draw(st.sampled_from(["", "a", "b", "c"]))
        if zone:
            zones[node] = zone
        for j in range(draw(st.integers(1, 3))):
            capacity = draw(st.integers(0, 64)) * MiB
            allocated = draw(st.integers(0, 64)) * MiB
            pools.append(PoolSpace(node, f"p{j}", capacity, allocated))
    return pools, zones


@settings(max_examples=300, deadline=None)
@given(clusters(), st.integers(1, 6), st.integers(1, 40), st.data())
def test_legs_land_on_distinct_nodes_within_free_space_or_the_refusal_is_right(
    cluster, legs, leg_mib, data
):
    pools, zones = cluster
    leg_bytes = leg_mib * MiB
    node_ids = sorted({p.node_id for p in pools})
    exclude = data.draw(st.lists(st.sampled_from(node_ids), max_size=2))
    eligible = {p.node_id for p in pools if p.node_id not in exclude and p.free_bytes >= leg_bytes}
    try:
        chosen = place_legs(
            pools, legs=legs, leg_bytes=leg_bytes, zones=zones, exclude_nodes=exclude
        )
    except OutOfRange:
        assert all(p.capacity_bytes < leg_bytes for p in pools if p.node_id not in exclude)
        return
    except ResourceExhausted as err:
        assert len(eligible) < legs
        assert f"{len(eligible)} are eligible" in err.message
        return
    assert len(chosen) == legs
    assert len({c.node_id for c in chosen}) == legs  # never two legs on one node
    assert all(c.free_bytes >= leg_bytes for c in chosen)  # never over capacity
    assert not {c.node_id for c in chosen} & set(exclude)
    # a zone is used twice only when every eligible zone already has a leg
    used = [zones[c.node_id] for c in chosen if c.node_id in zones]
    if len(used) != len(set(used)):
        free_zones = {zones[n] for n in eligible if n in zones} - set(used)
        assert not free_zones


@settings(max_examples=200, deadline=None)
@given(clusters(), st.integers(1, 4), st.data())
def test_the_first_leg_is_on_a_requisite_node_when_any_can_take_it(cluster, legs, data):
    pools, zones = cluster
    node_ids = sorted({p.node_id for p in pools})
    requisite = data.draw(st.lists(st.sampled_from(node_ids), min_size=1, max_size=3))
    try:
        chosen = place_legs(pools, legs=legs, leg_bytes=MiB, zones=zones, first_nodes=requisite)
    except (ResourceExhausted, OutOfRange):
        return
    assert chosen[0].node_id in requisite


def test_no_pool_at_all_is_resource_exhausted_not_a_crash():
    with pytest.raises(ResourceExhausted, match="0 are eligible"):
        place_legs([], legs=2, leg_bytes=MiB, zones={})
