"""Where management is, and one client for the length of a command.

Two ways to say where: `--state-dir` (default `.state`), whose stack.json
`tessera dev up` writes, or `--management URL --token-file FILE` for any
other installation (also from TESSERA_MANAGEMENT / TESSERA_TOKEN_FILE).
When management does not answer, the error says where the CLI looked and
how to point it elsewhere, because that is the usual fix.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from tessera.cli.failures import EXIT_FAILED, EXIT_USAGE, CliError, usage
from tessera.errors import Unauthenticated, Unavailable

if TYPE_CHECKING:
    # Imported where used: the wire models cost half of the CLI's start-up,
    # and `--help` or a typo should answer at once.
    from tessera.clients import ManagementClient
    from tessera.models import Page

T = TypeVar("T")

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="TESSERA_STATE_DIR",
        help="dev stack state directory; its stack.json says where management is",
    ),
]
Management = Annotated[
    str | None,
    typer.Option(
        "--management",
        envvar="TESSERA_MANAGEMENT",
        help="management URL, unix:///path.sock or http(s)://host:port (with --token-file)",
    ),
]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", envvar="TESSERA_TOKEN_FILE", help="management's bearer token"),
]

_ELSEWHERE = (
    "start the dev stack with `tessera dev up`, or point the CLI at management with "
    "--state-dir DIR, or --management URL --token-file FILE "
    "(or TESSERA_MANAGEMENT and TESSERA_TOKEN_FILE)"
)


@dataclass(frozen=True)
class Target:
    url: str
    token_file: Path
    #: where the URL came from, for error messages
    source: str


def find_target(state_dir: Path, management: str | None, token_file: Path | None) -> Target:
    if management or token_file:
        if not (management and token_file):
            raise usage("--management and --token-file go together: give both, or neither")
        return Target(management, token_file, "--management")
    stack_file = state_dir / "stack.json"
    try:
        info = json.loads(stack_file.read_text())
        return Target(info["management_url"], Path(info["token_file"]), str(stack_file))
    except FileNotFoundError:
        missing = f"no running dev stack in {state_dir}/ (no stack.json)"
        raise CliError(f"{missing}: {_ELSEWHERE}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read {stack_file}: {exc}") from None


@contextmanager
def connect(
    state_dir: Path, management: str | None, token_file: Path | None
) -> Iterator[ManagementClient]:
    """A management client; a failure to connect becomes one line saying where and what next."""
    from tessera.clients import ManagementClient

    target = find_target(state_dir, management, token_file)
    code = EXIT_USAGE if target.source == "--management" else EXIT_FAILED
    token = _token(target, code)
    try:
        client = ManagementClient(target.url, token)
    except ValueError as exc:  # a URL the client cannot use
        raise CliError(f"management URL from {target.source}: {exc}", code) from None
    try:
        yield client
    except Unavailable as exc:
        if not _could_not_connect(exc):
            raise  # management answered: a peer of management's is unavailable
        raise CliError(
            f"cannot reach management at {target.url} (from {target.source}): "
            f"{_reason(exc.__cause__)}; {_ELSEWHERE}"
        ) from exc
    except Unauthenticated as exc:
        raise CliError(
            f"management at {target.url} refused the token in {target.token_file} "
            f"({exc.message}): is it the token management was started with?"
        ) from exc
    finally:
        client.close()


def _token(target: Target, code: int) -> str:
    """The bearer token; `code` says whether a bad one is the command line's fault."""
    from tessera.http import read_token

    try:
        return read_token(target.token_file)
    except ValueError as exc:  # empty
        raise CliError(str(exc), code) from None
    except OSError as exc:
        problem = f"cannot read the token file {target.token_file}: {_reason(exc)}"
        raise CliError(problem, code) from None


def _could_not_connect(exc: Unavailable) -> bool:
    """Our own connection failed (the client chains the socket error), as opposed to a 503."""
    return isinstance(exc.__cause__, OSError | http.client.HTTPException)


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def all_items(fetch: Callable[..., Page[T]]) -> list[T]:
    """Every item of one of management's paginated lists, page after page."""
    items: list[T] = []
    token = ""
    while True:
        page = fetch(page_token=token)
        items.extend(page.items)
        token = page.next_token
        if not token:
            return items
