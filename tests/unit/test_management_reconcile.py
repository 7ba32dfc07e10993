"""`POST /v1/reconcile` as a REST contract (the comparisons run against real agents in
tests/integration/test_reconcile.py)."""

from __future__ import annotations

from tests.unit.management_fixtures import add_node, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]


def test_reconcile_without_a_body_only_reports(api):
    resp = api.post("/v1/reconcile")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"fix": False, "nodes_checked": [], "findings": []}


def test_a_mistyped_fix_flag_is_refused_naming_the_field(api):
    for body in ({"fix": "please"}, {"fixx": True}):
        resp = api.post("/v1/reconcile", json=body)
        assert resp.status_code == 422 and is_problem(resp), resp.text
        assert "fix" in resp.text


def test_a_node_whose_agent_does_not_answer_is_reported_not_skipped(api, tmp_path):
    add_node(api, "gone", f"unix://{tmp_path / 'nobody.sock'}", {"p": 1024**3})
    report = api.post("/v1/reconcile", json={"fix": True}).json()
    assert report["nodes_checked"] == []
    assert [(f["kind"], f["node_id"]) for f in report["findings"]] == [("node_unreachable", "gone")]
