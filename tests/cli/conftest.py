"""A real Tessera control plane for the CLI tests, and a way to run the CLI as a user does.

Management runs as its own process on a unix socket with a SQLite file, and
a real node-agent serves a directory pool of sparse files: creating and
deleting volumes needs no root, no loop device and no mount. The CLI runs
as a subprocess through the installed `tessera` console script, in an
80-column "terminal" (COLUMNS=80), and the tests look only at what a person
would see: exit code, stdout, stderr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tessera.clients import ManagementClient
from tessera.errors import TesseraError
from tests.integration.processes import spawn_module

TOKEN = "cli-test-token-0123456789"
NODE = "cli-node"
#: the console script pyproject.toml installs, next to the interpreter running the tests
TESSERA = Path(sys.executable).parent / "tessera"


@dataclass(frozen=True)
class Stack:
    dir: Path
    management_url: str
    token_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A user's environment: an 80-column terminal, management found through the env."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(
            COLUMNS="80",
            LINES="40",
            TESSERA_MANAGEMENT=self.management_url,
            TESSERA_TOKEN_FILE=str(self.token_file),
        )
        env.update(extra)
        return env

    def client(self) -> ManagementClient:
        return ManagementClient(self.management_url, TOKEN)


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def run_cli(stack: Stack | None, *args: str | bytes, **env: str) -> Result:
    """`tessera ARGS...` as typed in a shell; bytes arguments are passed undecoded."""
    base = stack.env(**env) if stack else {**os.environ, "COLUMNS": "80", **env}
    proc = subprocess.run(
        [str(TESSERA), *args], capture_output=True, env=base, timeout=60, stdin=subprocess.DEVNULL
    )
    return Result(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_one_line_error(result: Result, code: int) -> str:
    """Failed with `code`, exactly one `error:` line on stderr, no traceback, nothing on stdout."""
    assert result.code == code, result
    assert "Traceback" not in result.err, result.err
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("error: "), result.err
    return result.err_lines[0]


def _wait_for_pool(stack: Stack, procs: list[subprocess.Popen[bytes]]) -> None:
    client = stack.client()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    logs = "".join(p.read_text() for p in stack.dir.glob("*.log"))
                    raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{logs}")
            try:
                if client.list_pools().items:
                    return
            except TesseraError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError("management and the node-agent did not come up in 30 s")


def start_stack(
    base: Path, agent_args: tuple[str, ...] = ()
) -> tuple[Stack, list[subprocess.Popen[bytes]]]:
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    (base / "pool").mkdir()
    url = f"unix://{base / 'm.sock'}"
    stack = Stack(base, url, token_file)
    procs = [
        spawn_module(
            ["management", "--listen", url, "--db", f"sqlite:///{base / 'm.db'}",
             "--token-file", str(token_file)],
            base / "management.log",
        ),
        spawn_module(
            ["node_agent", "--node-id", NODE, "--management", url, "--token-file",
             str(token_file), "--pool", f"default={base / 'pool'}", "--socket",
             str(base / "agent.sock"), "--dev-dir", str(base / "dev"), *agent_args],
            base / "agent.log",
        ),
    ]  # fmt: skip
    try:
        _wait_for_pool(stack, procs)
    except BaseException:
        stop(procs)
        raise
    return stack, procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextmanager
def running_stack(prefix: str, agent_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """A control plane in a fresh short /tmp directory (unix socket paths must stay short)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        stack, procs = start_stack(base, agent_args)
        try:
            yield stack
        finally:
            stop(procs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """One control plane for the CLI tests."""
    with running_stack("tcli-") as stack:
        yield stack
