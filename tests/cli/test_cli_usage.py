"""What a person sees when the command line itself is wrong, or management is not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import Stack, assert_one_line_error, run_cli

COMMANDS = [
    ("dev",),
    ("volume",),
    ("node",),
    ("pool",),
    ("dev", "up"),
    ("volume", "list"),
    ("volume", "show"),
    ("volume", "create"),
    ("volume", "delete"),
    ("node", "list"),
    ("pool", "list"),
    ("reconcile",),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_shows_an_example_of_itself(command: tuple[str, ...]) -> None:
    result = run_cli(None, *command, "--help")
    assert result.code == 0, result
    assert "Examples" in result.out
    assert f"tessera {' '.join(command)}" in result.out.split("Examples", 1)[1]


def test_help_explains_the_exit_codes() -> None:
    result = run_cli(None, "--help")
    assert result.code == 0, result
    assert "Exit codes" in result.out and "--debug" in result.out


def test_tessera_alone_prints_help_not_an_error() -> None:
    result = run_cli(None)
    assert result.code == 0, result
    assert "Usage" in result.out and "volume" in result.out


INVALID = {
    "empty name": (["volume", "create", "", "--size", "1G"], "NAME must not be empty"),
    "blank name": (["volume", "create", "   "], "NAME must not be empty"),
    "size zero": (["volume", "create", "x", "--size", "0"], "--size must be more than 0"),
    "negative size": (["volume", "create", "x", "--size", "-1G"], "is not a size"),
    "size not a number": (["volume", "create", "x", "--size", "lots"], "is not a size"),
    "name too long": (["volume", "create", "n" * 129], "at most 128 characters"),
    "name too long to look up": (["volume", "show", "n" * 129], "at most 128 characters"),
    "bad -o": (["volume", "list", "-o", "xml"], "'xml' is not one of"),
    "unknown option": (["volume", "list", "--colour"], "No such option: --colour"),
    "missing volume": (["volume", "show"], "Missing argument"),
    "empty volume": (["volume", "delete", ""], "NAME|ID must not be empty"),
    "unknown command": (["volume", "resize", "x"], "No such command"),
    "management without token": (
        ["node", "list", "--management", "unix:///nowhere.sock"],
        "--management and --token-file go together",
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_input_is_one_red_line_and_exit_code_2(
    stack: Stack, case: tuple[list[str], str]
) -> None:
    args, says = case
    # TESSERA_MANAGEMENT etc. come from the environment, except for the case testing them
    env = {"TESSERA_TOKEN_FILE": ""} if "--management" in args else {}
    line = assert_one_line_error(run_cli(stack, *args, **env), 2)
    assert says in line


def test_unreachable_management_says_where_it_tried_and_how_to_point_elsewhere(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    url = f"unix://{tmp_path / 'management.sock'}"
    result = run_cli(None, "volume", "list", "--management", url, "--token-file", str(token))
    line = assert_one_line_error(result, 1)
    assert f"cannot reach management at {url}" in line
    assert "--management URL --token-file FILE" in line and "--state-dir" in line


def test_missing_dev_stack_says_how_to_start_one(tmp_path: Path) -> None:
    result = run_cli(None, "volume", "list", "--state-dir", str(tmp_path))
    line = assert_one_line_error(result, 1)
    assert "tessera dev up" in line and str(tmp_path) in line


def test_debug_adds_the_traceback_and_still_ends_with_the_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    url = f"unix://{tmp_path / 'management.sock'}"
    args = ["volume", "show", "db", "--management", url, "--token-file", str(token), "--debug"]
    result = run_cli(None, *args)
    assert result.code == 1
    assert "Traceback" in result.err
    assert result.err_lines[-1].startswith("error: cannot reach management")


def test_python_dash_m_runs_the_same_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "volume", "create", "", "--size", "1G"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: NAME must not be empty\n"
