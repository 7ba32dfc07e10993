"""Volumes through the CLI against real management and a real agent, as a user sees them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.cells import cell_len

from tessera.models import AccessMode, Node, Page, Pool, Volume, VolumeCreate
from tests.cli.conftest import NODE, Stack, assert_one_line_error, run_cli

LONG_NAME = "invoices-2026-postgres-primary-data-for-the-eu-west-region"


def create(stack: Stack, name: str, size: str = "16M") -> Volume:
    result = run_cli(stack, "volume", "create", name, "--size", size, "-o", "json")
    assert result.code == 0, result
    return Volume.model_validate_json(result.out)


def made(stack: Stack, name: str) -> Volume:
    """A volume made through the API: for tests whose subject is not `volume create`."""
    client = stack.client()
    try:
        return client.create_volume(VolumeCreate(name=name, size_bytes=16 * 1024**2))
    finally:
        client.close()


def test_volume_is_shown_and_deleted_by_name_or_by_id(stack: Stack) -> None:
    v = create(stack, "by-name-or-id")
    for ref in ("by-name-or-id", v.id):
        shown = run_cli(stack, "volume", "show", ref)
        assert shown.code == 0, shown
        assert v.id in shown.out and "by-name-or-id" in shown.out
    deleted = run_cli(stack, "volume", "delete", "by-name-or-id")
    assert deleted.code == 0, deleted
    assert v.id in deleted.out
    again = create(stack, "by-name-or-id")
    assert run_cli(stack, "volume", "delete", again.id).code == 0
    line = assert_one_line_error(run_cli(stack, "volume", "show", again.id), 1)
    assert again.id in line


def test_unknown_volume_is_one_red_line_and_exit_code_1(stack: Stack) -> None:
    for command in ("show", "delete"):
        line = assert_one_line_error(run_cli(stack, "volume", command, "no-such-volume"), 1)
        assert line == "error: no volume has the name or ID 'no-such-volume'"


def test_delete_ignore_not_found_lets_scripts_delete_twice(stack: Stack) -> None:
    made(stack, "twice")
    assert run_cli(stack, "volume", "delete", "twice", "--ignore-not-found").code == 0
    result = run_cli(stack, "volume", "delete", "twice", "--ignore-not-found")
    assert result.code == 0, result
    assert "nothing to delete" in result.out


def test_a_name_that_looks_like_an_id_still_finds_its_volume(stack: Stack) -> None:
    name = "vol-" + "0" * 32
    v = create(stack, name)
    result = run_cli(stack, "volume", "show", name, "-o", "json")
    assert result.code == 0, result
    assert Volume.model_validate_json(result.out).id == v.id != name


def test_create_again_with_the_same_name_answers_the_same_volume(stack: Stack) -> None:
    assert create(stack, "idempotent").id == create(stack, "idempotent").id


def test_80_column_list_shows_every_id_and_name_whole(stack: Stack) -> None:
    volumes = [made(stack, "short"), made(stack, LONG_NAME)]
    result = run_cli(stack, "volume", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), result.out
    assert "…" not in result.out
    for v in volumes:
        assert v.id in result.out
        assert v.name in _name_cells(lines, v.id)


def test_terminal_narrower_than_an_id_still_shows_every_id_whole(stack: Stack) -> None:
    v = made(stack, "narrow")
    result = run_cli(stack, "volume", "list", COLUMNS="30")
    assert result.code == 0, result
    assert v.id in result.out and "…" not in result.out


def _name_cells(lines: list[str], volume_id: str) -> str:
    """The NAME cell of a volume's row, joined back where it wrapped onto the next lines."""
    start = lines[0].index("NAME")
    row = next(i for i, line in enumerate(lines) if line.startswith(volume_id))
    text = lines[row][start:].split("  ")[0]
    for line in lines[row + 1 :]:
        if line[:start].strip():  # the next volume's row
            break
        text += line[start:].split("  ")[0].strip()
    return text


def test_wide_output_shows_every_column(stack: Stack) -> None:
    made(stack, "wide-one")
    result = run_cli(stack, "volume", "list", "-o", "wide")
    assert result.code == 0, result
    header = result.out.splitlines()[0].split()
    for column in ("ID", "NAME", "SIZE", "STATE", "NODE", "POOL", "CREATED", "VPG", "PARAMETERS"):
        assert column in header
    row = next(line for line in result.out.splitlines() if "wide-one" in line)
    assert NODE in row and "default" in row


def test_json_and_yaml_are_the_wire_models_for_scripts(stack: Stack) -> None:
    v = made(stack, "scripted")
    as_json = run_cli(stack, "volume", "list", "-o", "json")
    as_yaml = run_cli(stack, "volume", "list", "-o", "yaml")
    assert as_json.code == as_yaml.code == 0
    listed = Page[Volume].model_validate(json.loads(as_json.out))
    assert v.id in {item.id for item in listed.items}
    assert yaml.safe_load(as_yaml.out) == json.loads(as_json.out)
    shown = run_cli(stack, "volume", "show", "scripted", "-o", "yaml")
    assert Volume.model_validate(yaml.safe_load(shown.out)) == v.model_copy(
        update={"published_nodes": []}
    )
    nodes = Page[Node].model_validate_json(run_cli(stack, "node", "list", "-o", "json").out)
    assert [n.id for n in nodes.items] == [NODE]
    pools = Page[Pool].model_validate(
        yaml.safe_load(run_cli(stack, "pool", "list", "-o", "yaml").out)
    )
    assert [(p.node_id, p.name) for p in pools.items] == [(NODE, "default")]


def test_node_and_pool_tables_fit_80_columns(stack: Stack) -> None:
    for command in ("node", "pool"):
        result = run_cli(stack, command, "list")
        assert result.code == 0, result
        assert NODE in result.out
        assert all(cell_len(line) <= 80 for line in result.out.splitlines()), result.out


def test_refusal_from_management_is_one_red_line_and_exit_code_1(stack: Stack) -> None:
    v = made(stack, "attached")
    client = stack.client()
    try:
        client.attach(v.id, NODE, AccessMode.SINGLE_NODE_WRITER, readonly=False)
        line = assert_one_line_error(run_cli(stack, "volume", "delete", "attached"), 1)
        assert "still attached" in line and NODE in line
        shown = run_cli(stack, "volume", "show", "attached")
        assert f"{NODE} (SINGLE_NODE_WRITER)" in shown.out
    finally:
        client.detach(v.id, NODE)
        client.close()
    assert run_cli(stack, "volume", "delete", "attached").code == 0


def test_invalid_input_that_only_management_can_judge_is_exit_code_2(stack: Stack) -> None:
    line = assert_one_line_error(run_cli(stack, "volume", "show", "bad\x01name"), 2)
    assert "control characters" in line
    line = assert_one_line_error(
        run_cli(stack, "volume", "create", "huge", "--size", "9999999T"), 2
    )
    assert "size_bytes" in line


def test_state_dir_finds_management_through_stack_json(stack: Stack, tmp_path: Path) -> None:
    info = {"management_url": stack.management_url, "token_file": str(stack.token_file)}
    (tmp_path / "stack.json").write_text(json.dumps(info))
    env = {"TESSERA_MANAGEMENT": "", "TESSERA_TOKEN_FILE": ""}
    result = run_cli(stack, "node", "list", "--state-dir", str(tmp_path), **env)
    assert result.code == 0, result
    assert NODE in result.out


def test_wrong_token_says_which_token_file_management_refused(stack: Stack, tmp_path: Path) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    line = assert_one_line_error(run_cli(stack, "volume", "list", TESSERA_TOKEN_FILE=str(wrong)), 1)
    assert f"refused the token in {wrong}" in line
