"""Logs and metrics as an operator sees them (docs/observability.md).

Real parts: the management app on SQLite and PostgreSQL with the fake
agent of management_fixtures, the real node-agent app on a directory
pool, the real executables for --version. No process is left running.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from management.app import create_app
from node_agent.agent import Agent
from node_agent.api import create_app as create_agent_app
from node_agent.pools import Pool
from tessera import __version__
from tessera.observability import logs
from tessera.observability.metrics import NAMES
from tests.unit.management_fixtures import TOKEN, GiB, add_node, create

pytest_plugins = ["tests.unit.management_fixtures"]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "tessera" / "dashboards" / "tessera.json"
PSK = "ab" * 32


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def grew(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much a counter grew between two scrapes (the registry is process-wide)."""
    return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)


# ---- logs ------------------------------------------------------------------------------


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """Root logging to a buffer through configure_logging's handler; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    handler = logs.configure_logging("DEBUG", "json")
    handler.setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize(
    "line",
    [
        "Authorization: Bearer s3cret-token-value",
        "postgresql+psycopg://tessera:hunter2hunter2@db:5432/tessera",
        '{"psk_identity": "vol-1", "psk_key": "abc"}',
        f"vol-1:{PSK}",
        "registering with token=s3cret-token-value done",
        "request {'secrets': {'password': 'x'}, 'name': 'pvc-1'}",
        'CreateVolumeRequest name: "pvc-1" secrets { key: "k" value: "v" }',
    ],
)
def test_secret_shaped_values_never_reach_a_log_line(line: str) -> None:
    out = logs.redact(line)
    assert logs.REDACTED in out
    for secret in ("s3cret-token-value", "hunter2hunter2", '"abc"', PSK, "'x'", '"v"'):
        assert secret not in out, out


def test_redaction_leaves_ids_and_plain_sentences_alone() -> None:
    for line in (
        "volume vol-0123456789abcdef0123456789abcdef attached on node n1",
        "missing bearer token: send 'Authorization: Bearer <token>'",
        "GET /v1/volumes/{volume_id} 404 1.2ms",
    ):
        assert logs.redact(line) == line


def test_json_lines_carry_the_fields_and_redact_a_registered_token_even_in_tracebacks(
    logged: io.StringIO,
) -> None:
    logs.register_secret("the-process-token-0123")
    log = logging.getLogger("tessera.test")
    with logs.request_scope("req-42"):
        log.info("called with %s", "the-process-token-0123", extra={"volume_id": "vol-1"})
        try:
            raise ValueError("bad the-process-token-0123")
        except ValueError:
            log.exception("failed")
    lines = [json.loads(line) for line in logged.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == [f"called with {logs.REDACTED}", "failed"]
    first = lines[0]
    assert first["level"] == "INFO" and first["logger"] == "tessera.test"
    assert first["request_id"] == "req-42" and first["volume_id"] == "vol-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "ValueError" in lines[1]["exc"]
    assert "the-process-token-0123" not in logged.getvalue()


def test_auto_format_is_json_when_stderr_is_not_a_terminal() -> None:
    code = (
        "import logging; from tessera.observability.logs import configure_logging; "
        "configure_logging('INFO', 'auto'); logging.getLogger('x').info('hello')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stderr)["msg"] == "hello"
    text = code.replace("'auto'", "'text'")
    done = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, check=True)
    assert done.stderr.rstrip().endswith("INFO x: hello")


@pytest.mark.parametrize(
    "module, prog",
    [("management", "tessera-management"), ("node_agent", "tessera-node-agent"),
     ("csi_driver", "tessera-csi"), ("tessera.cli", "tessera")],
)  # fmt: skip
def test_version_prints_program_and_version(module: str, prog: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{prog} {__version__}"


def test_a_bad_request_id_from_a_client_is_replaced() -> None:
    assert logs.request_id_from("abc-123") == "abc-123"
    for bad in ("has space", "x" * 200, "line\nbreak", ""):
        assert re.fullmatch(r"[0-9a-f]{32}", logs.request_id_from(bad))


# ---- management ------------------------------------------------------------------------


def test_management_metrics_and_readyz_answer_without_the_token_and_v1_still_needs_it(
    db_url: str,
) -> None:
    app = create_app(db_url, TOKEN)
    with TestClient(app) as client:
        assert client.get("/v1/volumes").status_code == 401
        assert client.get("/readyz").json() == {"status": "ok"}
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith(
            "text/plain"
        )
        assert "process_resident_memory_bytes" in metrics.text
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_request_metrics_use_route_templates_never_raw_paths_and_echo_the_request_id(
    api: TestClient,
) -> None:
    missing = "vol-" + "0" * 32
    before = samples(api.get("/metrics").text)
    resp = api.get(f"/v1/volumes/{missing}", headers={"X-Request-Id": "trace-7"})
    assert resp.status_code == 404 and resp.headers["x-request-id"] == "trace-7"
    assert api.get("/no/such/thing").status_code == 404
    refused = api.delete(f"/v1/volumes/{missing}", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and re.fullmatch(
        r"[0-9a-f]{32}", refused.headers["x-request-id"]
    )
    found = samples(api.get("/metrics").text)
    total = "tessera_http_requests_total"
    route = "/v1/volumes/{volume_id}"
    common = {"process": "management", "route": route}
    assert grew(before, found, total, method="GET", status="404", **common) == 1
    assert grew(before, found, total, method="DELETE", status="401", **common) == 1
    assert (
        grew(
            before,
            found,
            total,
            process="management",
            route="unmatched",
            method="GET",
            status="404",
        )
        == 1
    )
    routes = {dict(labels).get("route") for (_, labels) in found}
    assert not any(r and (missing in r or "no/such" in r) for r in routes), routes


def test_readyz_is_503_when_the_database_is_gone(tmp_path: Path) -> None:
    home = tmp_path / "db"
    home.mkdir()
    app = create_app(f"sqlite:///{home / 'm.db'}", TOKEN)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        app.state.ctx.db.dispose()
        shutil.rmtree(home)
        resp = client.get("/readyz")
        assert resp.status_code == 503, resp.text
        assert "database" in resp.json()["detail"]
        assert client.get("/healthz").status_code == 200  # alive, not ready
        assert client.get("/metrics").status_code == 200  # process metrics still served


def test_inventory_gauges_count_pools_volumes_attachments_and_node_states(
    cluster: TestClient,
    agent,
) -> None:
    ctx = cluster.app.state.ctx  # type: ignore[attr-defined]
    add_node(cluster, "n3", agent.url, {})
    on_n1 = create(cluster, "on-n1", GiB, requisite_nodes=["n1"])
    create(cluster, "on-n2", 2 * GiB, requisite_nodes=["n2"])
    body = {"access_mode": "SINGLE_NODE_WRITER"}
    assert cluster.put(f"/v1/volumes/{on_n1['id']}/attachments/n1", json=body).status_code == 200
    found = samples(cluster.get("/metrics").text)
    assert value(found, "tessera_pool_capacity_bytes", node="n1", pool="p1") == 10 * GiB
    assert value(found, "tessera_pool_allocated_bytes", node="n1", pool="p1") == GiB
    assert value(found, "tessera_pool_allocated_bytes", node="n2", pool="p2") == 2 * GiB
    assert value(found, "tessera_volumes", condition="available") == 2
    assert value(found, "tessera_volumes", condition="degraded") == 0
    assert value(found, "tessera_attachments", state="ready") == 1
    assert value(found, "tessera_nodes", state="online") == 3
    # n2 stops beating and n3 is fenced: the volume on n2 is degraded
    now = ctx.clock() + 3600
    ctx.clock = lambda: now
    assert cluster.post("/v1/nodes/n1/heartbeat").status_code == 200
    assert cluster.post("/v1/nodes/n3/fence", json={}).status_code == 200
    found = samples(cluster.get("/metrics").text)
    assert value(found, "tessera_nodes", state="online") == 1
    assert value(found, "tessera_nodes", state="unreachable") == 1
    assert value(found, "tessera_nodes", state="fenced") == 1
    assert value(found, "tessera_volumes", condition="available") == 1
    assert value(found, "tessera_volumes", condition="degraded") == 1


# ---- node-agent ------------------------------------------------------------------------


def test_agent_metrics_and_readyz_are_open_and_count_nothing_on_an_idle_node(
    tmp_path: Path,
) -> None:
    (tmp_path / "pool").mkdir()
    agent = Agent(
        "n1", {"p": Pool("p", tmp_path / "pool")}, tmp_path / "dev", state_dir=tmp_path / "state"
    )
    app = create_agent_app(agent, TOKEN)
    with TestClient(app) as client:
        assert client.get("/v1/attachments").status_code == 401
        before = samples(client.get("/metrics").text)
        assert client.get("/readyz").json() == {"status": "ok"}
        found = samples(client.get("/metrics").text)
    assert value(found, "tessera_attachments_local", transport="loop") == 0
    for kind in ("nbdkit_export", "nbd_client"):
        assert value(found, "tessera_datapath_processes", kind=kind, healthy="true") == 0
    assert grew(before, found, "tessera_http_requests_total", process="node-agent",
                route="/readyz", method="GET", status="200") == 1  # fmt: skip


# ---- the dashboard ---------------------------------------------------------------------


def test_every_metric_the_dashboard_queries_is_one_the_processes_serve() -> None:
    """A renamed metric would leave a panel empty without any error."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard has no queries"
    queried = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for expr in exprs
        for name in re.findall(r"\b(tessera_[a-z_]+|process_[a-z_]+)\b", expr)
    }
    assert {n for n in queried if n.startswith("tessera_")} <= NAMES
    assert queried & NAMES == NAMES, f"not on the dashboard: {NAMES - queried}"
    served = {name for name, _ in samples(generate_latest().decode())}
    assert {n for n in queried if n.startswith("process_")} <= served


def test_csi_plugin_refuses_to_start_when_its_metrics_port_is_taken(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("plugin-token-0123456789\n")
    args = [sys.executable, "-m", "csi_driver", "--mode", "controller",
            "--endpoint", f"unix://{tmp_path / 'csi.sock'}", "--management",
            "http://127.0.0.1:9", "--token-file", str(token)]  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*args, "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"--metrics-listen 127.0.0.1:{port}: cannot listen" in done.stderr
    assert not (tmp_path / "csi.sock").exists()
    bad = subprocess.run(
        [*args, "--metrics-listen", "nowhere"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--metrics-listen: 'nowhere' is not HOST:PORT" in bad.stderr
