"""Schemathesis against management's and the node-agent's OpenAPI documents (issue 6, item 3).

Real processes: management on TCP with SQLite, one node-agent on its unix
socket whose pool is a 512 MiB loop-mounted XFS image (so no file a fuzzer
asks for can outgrow it, and attachments are real loop devices). Every
operation is fuzzed with and without schema-valid input, with the bearer
token; then stateful runs follow the links schemathesis infers (create a
volume -> get / expand / attach / delete it; register a node -> its pools).

What must hold for every answer: no 500 ever, and a 5xx only as a documented
problem about a peer or capacity; every 4xx/5xx is application/problem+json
with type, title, status and a detail a person can read; status codes,
content types and bodies match the document; malformed input is refused
with a 4xx; the API refuses calls without the token. The budget is fixed
and the generation derandomized, so a run is repeatable and takes about a
minute on two cores. Every failure found is kept as a plain regression test
in tests/fuzz/test_rest_regressions.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import initialize
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.generation.stateful.state_machine import StepInput

from tessera.errors import PROBLEM_JSON, PROBLEM_TYPE_PREFIX, TesseraError
from tessera.ids import new_volume_id
from tests.conftest import needs_root
from tests.fuzz.rest_fixtures import NODE_ID, POOL, TOKEN, RestStack, running_stack, tcp_relay

pytestmark = [needs_root, pytest.mark.root]

MiB = 1024**2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: examples per operation (stateless) and scenarios per stateful run: the fixed budget
EXAMPLES = 30
SCENARIOS = 40
STEPS = 6

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # same examples on every run: a failure in CI reproduces locally
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
STATEFUL_SETTINGS = settings(FUZZ_SETTINGS, max_examples=SCENARIOS, stateful_step_count=STEPS)


# ---- the stack, its documents (the agent's through a TCP relay to its socket) ----------


@pytest.fixture(scope="module")
def rest_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestStack]:
    with running_stack(tmp_path_factory.mktemp("rest-fuzz"), 512 * MiB) as stack:
        yield stack
        release_everything(stack)


def release_everything(stack: RestStack) -> None:
    """What the fuzzers left: detach and delete through the agent, so nothing stays bound."""
    agent = stack.agent()
    try:
        for attachment in agent.list_attachments():
            for key in attachment.views:
                agent.release_view(attachment.volume_id, key)
            agent.detach(attachment.volume_id)
        volumes = stack.pool_dir / "volumes"
        for path in volumes.glob("vol-*.img"):
            agent.delete_volume(path.stem)
        assert list(volumes.iterdir()) == [], "volume files left in the pool"
    finally:
        agent.close()


def forget_volumes(stack: RestStack) -> None:
    """Every volume management knows, detached and deleted (those it can reach)."""
    mgmt = stack.management()
    try:
        for volume in mgmt.list_volumes(max_entries=1000).items:
            for node_id in volume.published_nodes:
                mgmt.detach(volume.id, node_id)
            with contextlib.suppress(TesseraError):  # its node's agent may be made up
                mgmt.delete_volume(volume.id)
    finally:
        mgmt.close()


@pytest.fixture(scope="module")
def agent_url(rest_stack: RestStack) -> Iterator[str]:
    with tcp_relay(rest_stack.agent_socket) as url:
        yield url


#: the suffix of names invented in the current stateful scenario ("" when stateless)
SCENARIO = {"suffix": ""}
_SCENARIOS = itertools.count(1)


def namespace(case: Case) -> None:
    """In a stateful scenario, every name the fuzzer invents gets the scenario's suffix.

    Management keeps what a scenario made that no reset can remove (nodes,
    pools, vpgs, volumes on made-up nodes). Hypothesis re-runs scenarios while
    it explores; with fresh names a re-run meets the same (empty) world and
    gets the same answers, instead of "already exists" the second time.
    """
    suffix = SCENARIO["suffix"]
    if not suffix:
        return
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("name"), str):
        keep = 63 if case.operation.path == "/v1/vpgs" else 128
        case.body = {**body, "name": body["name"][: keep - len(suffix)] + suffix}
    params = case.path_parameters or {}
    if case.operation.path.startswith("/v1/nodes/{node_id}") and case.method != "GET":
        renamed = {
            k: v[: 128 - len(suffix)] + suffix
            for k, v in params.items()
            if k in ("node_id", "pool") and isinstance(v, str)
        }
        case.path_parameters = {**params, **renamed}


_SERVER_IDS = re.compile(r"vol-[0-9a-f]{32}")


def steer_half_to_real_resources(schema: Any) -> None:
    """Half the schema-valid bodies name what exists: the real pool, vpg and node, small sizes.

    Random names are only ever 404s and random sizes mostly out of range, so
    without this no volume would be created, grown, attached or deleted and
    the stateful links would have nothing to follow. Which half is decided by
    a checksum of the generated case, so runs stay repeatable.
    """

    @schema.hook("map_case")
    def steer(context: Any, case: Case) -> Case:
        # decided on what hypothesis generated, before any renaming: IDs the server
        # made (links put them in) differ on every run, so they are left out
        generated = _SERVER_IDS.sub("vol-", repr((case.path_parameters, case.body)))
        to_real = zlib.crc32(generated.encode()) % 2 == 0
        if case.operation.path.startswith("/v1/nodes/{node_id}") and case.method != "GET":
            # the real node is registered by its agent, with what the agent really has:
            # a fuzzed registration (or pool) for it would send volumes nowhere
            params = case.path_parameters or {}
            if params.get("node_id") == NODE_ID:
                case.path_parameters = {**params, "node_id": NODE_ID + "-not"}
        meta = case.meta
        if to_real and meta is not None and meta.generation.mode.is_positive:
            _to_real_resources(case)
        namespace(case)
        return case


def _to_real_resources(case: Case) -> None:
    body = case.body
    if isinstance(body, dict):
        real = {"pool": POOL, "vpg": "default", "requisite_nodes": [NODE_ID], "limit_bytes": 0}
        body = {**body, **{k: v for k, v in real.items() if k in body}}
        if isinstance(body.get("size_bytes"), int):
            body["size_bytes"] = body["size_bytes"] % (64 * MiB) + 1
        case.body = body
    if "node_id" in (case.path_parameters or {}) and "/attachments/" in case.operation.path:
        case.path_parameters = {**case.path_parameters, "node_id": NODE_ID}


@pytest.fixture(scope="module")
def management_schema(rest_stack: RestStack) -> Any:
    schema = schemathesis.openapi.from_url(f"{rest_stack.url}/openapi.json")
    schema.config.update(headers=AUTH)
    steer_half_to_real_resources(schema)
    return schema


@pytest.fixture(scope="module")
def agent_schema(agent_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{agent_url}/openapi.json")
    schema.config.update(headers=AUTH)

    steer_half_to_real_resources(schema)
    return schema


# ---- our checks, on top of schemathesis' own --------------------------------------------

_NOT_FOR_PEOPLE = re.compile(
    r"Traceback|File \"|object at 0x|pydantic|sqlalchemy|sqlite3\.|<class |\bNone\b$"
)


def problem_documents(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx/5xx is a Tessera problem document with a detail a person can read."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0] == PROBLEM_JSON, (
        f"{response.status_code} answered as {content_type!r}, not {PROBLEM_JSON}"
    )
    body = json.loads(response.content)
    missing = {"type", "title", "status", "detail"} - set(body)
    assert not missing, f"problem document lacks {sorted(missing)}: {body}"
    assert body["status"] == response.status_code, body
    assert str(body["type"]).startswith(PROBLEM_TYPE_PREFIX), body
    detail = body["detail"]
    assert isinstance(detail, str) and detail.strip(), body
    assert len(detail) <= 2000, f"detail is {len(detail)} characters"
    assert not _NOT_FOR_PEOPLE.search(detail), f"detail is not for people: {detail!r}"
    return True


#: rules a JSON schema cannot state; input that breaks only these is refused though schema-valid
RULES_NOT_IN_THE_SCHEMA = {
    "page_token": "an opaque token is valid only if this server issued it",
    "layout": "a layout that is not one of concat, raid0, raid1, raid10 is refused naming them",
    "legs": "how many legs a layout takes depends on the layout (tessera.layouts.LEG_RANGE): a "
    "rule across fields",
    "chunk_bytes": "a chunk is a power of two, and only striped layouts take one: a rule across "
    "fields",
    "parameters": "parameters.transport (in a free-form map) must be nbd or nvme-tcp",
    "readonly": "a reader-only access mode needs readonly=true: a rule across two fields",
    "preferred_nodes": "with locality=required the consumer (the first preferred node) must be "
    "one of requisite_nodes: a rule across fields",
    "publish_context": "an nbd connection needs host and port: a rule across fields",
    "publish_context.pskIdentity": "an nbd connection needs a TLS-PSK identity: a rule across "
    "fields",
}


def schema_states_every_form_rule(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Schema-valid input is never refused as malformed: the document states every form rule.

    Stricter than schemathesis' positive_data_acceptance where it matters and
    looser where HTTP allows: a valid-looking size can still be out of range
    for this pool (422 out-of-range), which no schema can know.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code >= 500:
        return None
    if response.status_code not in (400, 422):
        return None
    body = json.loads(response.content)
    if body["type"] != PROBLEM_TYPE_PREFIX + "invalid-argument":
        return True
    assert body.get("field") in RULES_NOT_IN_THE_SCHEMA, (
        f"schema-valid input refused as malformed (the OpenAPI document should say so): "
        f"{body.get('detail')}"
    )
    return True


def server_errors_only_as_documented(allowed: dict[int, str]) -> Callable[..., bool | None]:
    """No 500 ever; another 5xx only with the problem type that explains it."""

    def check(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        status = response.status_code
        if status < 500:
            return None
        body = json.loads(response.content)
        assert status in allowed, f"server error {status}: {body.get('detail')}"
        assert body["type"] == PROBLEM_TYPE_PREFIX + allowed[status], body
        return True

    check.__name__ = "server_errors_only_as_documented"
    return check


# management may place a volume on a node the fuzzer registered with an agent
# URL that points nowhere (503 unreachable), and pools fill up (507)
MANAGEMENT_5XX = server_errors_only_as_documented(
    {503: "unavailable", 507: "resource-exhausted", 502: "misconfigured"}
)
AGENT_5XX = server_errors_only_as_documented({507: "resource-exhausted"})
#: (service, operation, status) -> answers seen: printed per test (-s) for the CI record
TALLY: Counter[tuple[str, str, int]] = Counter()


def tally(service: str) -> Callable[..., bool | None]:
    def check(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        TALLY[(service, case.operation.label, response.status_code)] += 1
        return None

    check.__name__ = "tally"
    return check


def report(service: str, what: str) -> None:
    rows = sorted((k, n) for k, n in TALLY.items() if k[0] == service)
    print(f"\n{service} {what}: {sum(n for _, n in rows)} requests")
    for (_, operation, status), n in rows:
        print(f"  {operation:55} {status}  x{n}")
    for key in [k for k, _ in rows]:
        del TALLY[key]


MANAGEMENT_CHECKS = [
    problem_documents,
    schema_states_every_form_rule,
    MANAGEMENT_5XX,
    tally("management"),
]
AGENT_CHECKS = [problem_documents, schema_states_every_form_rule, AGENT_5XX, tally("node-agent")]

# replaced by the stricter checks above
EXCLUDED = [schemathesis.checks.not_a_server_error, schemathesis.checks.positive_data_acceptance]


# ---- stateless: every operation ---------------------------------------------------------


def fuzz_every_operation(schema: Any, call: Callable[[Case], None]) -> dict[str, int]:
    """Each operation, schema-valid and schema-violating input; operations fuzzed per mode.

    Driven with hypothesis directly (schemathesis' pytest plugin does not run
    on this pytest); the first failure stops the run with schemathesis' report.
    """
    ran = {"positive": 0, "negative": 0}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_one(operation.as_strategy(generation_mode=mode), call)
            except Unsatisfiable:
                # an operation without any input (GET /healthz) cannot be sent invalid input
                assert mode == GenerationMode.NEGATIVE, operation.label
                continue
            ran[mode.value] += 1
    return ran


def _fuzz_one(strategy: Any, call: Callable[[Case], None]) -> None:
    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case: Case) -> None:
        call(case)

    run()


def test_management_answers_any_request_as_its_openapi_document_says(
    management_schema: Any,
) -> None:
    def call(case: Case) -> None:
        case.call_and_validate(
            excluded_checks=EXCLUDED,
            additional_checks=MANAGEMENT_CHECKS,
        )

    operations = fuzz_every_operation(management_schema, call)
    report("management", f"stateless ({operations} operation x mode runs)")


def test_node_agent_answers_any_request_as_its_openapi_document_says(agent_schema: Any) -> None:
    def call(case: Case) -> None:
        case.call_and_validate(
            excluded_checks=EXCLUDED,
            additional_checks=AGENT_CHECKS,
        )

    operations = fuzz_every_operation(agent_schema, call)
    report("node-agent", f"stateless ({operations} operation x mode runs)")


# ---- stateful: follow the links ---------------------------------------------------------


def run_statefully(
    schema: Any,
    checks: list[Callable[..., bool | None]],
    seed: tuple[str, str, Any],
    reset: Callable[[], None],
) -> None:
    """Scenarios along the links schemathesis infers from paths and response schemas.

    `seed` (method, path, case factory) is a real resource each scenario starts
    from: schemathesis starts scenarios only at POSTs and lists, so without it
    the agent's PUT-created volumes would never be followed to get / resize /
    attach / delete. `reset` runs after every scenario, so each starts from the
    same state: hypothesis replays scenarios while it explores and shrinks, and
    a server that remembers the last one would answer a replay differently.
    """
    # Scenarios send schema-valid requests: malformed input is the stateless tests' job,
    # and a link that fills a negative case's path with a real ID makes it valid again.
    schema.config.phases.stateful.generation.update(modes=[GenerationMode.POSITIVE])
    machine = schema.as_state_machine()
    method, path, make = seed
    operation = schema[path][method]
    status = "201" if method == "POST" else "200"

    @initialize(target=machine.bundles[f"{method} {path} -> {status}"])
    def create_a_real_one(self: Any) -> Any:
        SCENARIO["suffix"] = f"-s{next(_SCENARIOS)}"
        case = operation.Case(**make())
        step = StepInput.initial(case)
        self.recorder.record_case(case=case)  # links from it look their parent up
        self.control.record_step(step, self.recorder)
        return self._step(step)

    def teardown(self: Any) -> None:
        reset()
        machine.teardown(self)

    attrs = {
        "validate_response": _validate_with(checks),
        "create_a_real_one": create_a_real_one,
        "teardown": teardown,
    }
    scenario = type("Scenario", (machine,), attrs)
    try:
        scenario.run(settings=STATEFUL_SETTINGS)
    finally:
        SCENARIO["suffix"] = ""


def _validate_with(checks: list[Callable[..., bool | None]]) -> Callable[..., None]:
    def validate_response(
        self: Any, response: Response, case: Case, additional_checks: Any = None, **kwargs: Any
    ) -> None:
        case.validate_response(
            response,
            excluded_checks=EXCLUDED,
            additional_checks=checks,
            transport_kwargs=kwargs or None,
            recorder=getattr(self, "recorder", None),
        )

    return validate_response


# The same resource every scenario (created, or found by its idempotent create): an
# outcome that does not depend on what earlier scenarios did keeps hypothesis' replay
# of a scenario faithful.
SEED_AGENT_VOLUME = new_volume_id()


def _a_new_volume() -> dict[str, Any]:
    body = {"name": "stateful-seed", "size_bytes": MiB, "requisite_nodes": [NODE_ID]}
    return {"body": body, "headers": dict(AUTH)}


def _a_new_agent_volume() -> dict[str, Any]:
    return {
        "path_parameters": {"volume_id": SEED_AGENT_VOLUME},
        "body": {"pool": POOL, "size_bytes": MiB},
        "headers": dict(AUTH),
    }


def test_management_sequences_of_calls_keep_every_answer_documented(
    management_schema: Any, rest_stack: RestStack
) -> None:
    def reset() -> None:
        forget_volumes(rest_stack)

    run_statefully(
        management_schema, MANAGEMENT_CHECKS, ("POST", "/v1/volumes", _a_new_volume), reset
    )
    report("management", "stateful")


def test_node_agent_sequences_of_calls_keep_every_answer_documented(
    agent_schema: Any, rest_stack: RestStack
) -> None:
    def reset() -> None:
        release_everything(rest_stack)

    run_statefully(
        agent_schema, AGENT_CHECKS, ("PUT", "/v1/volumes/{volume_id}", _a_new_agent_volume), reset
    )
    report("node-agent", "stateful")
