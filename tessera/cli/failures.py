"""How the `tessera` command fails: one red line on stderr and an exit code.

Admins script around exit codes the way they do with kubectl, so the codes
carry one meaning each:

- 0: done.
- 1: the request was fine but did not succeed: the volume does not exist,
  management refused it (attached, no space, ...), or management could not
  be reached.
- 2: the command line is wrong (unknown option, empty name, size 0, a bad
  `-o` value, or a value management rejected as invalid): nothing changed,
  and running it again unchanged will fail again.

A Python traceback is a bug report, not a message: it is shown only with
`--debug`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from tessera.errors import InvalidArgument, OutOfRange, TesseraError

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[no-redef]

__all__ = ["CliError", "NoArgsIsHelpError", "describe", "report", "usage"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: errors that say the request itself is invalid, whoever noticed it
_INVALID = (InvalidArgument, OutOfRange)

err_console = Console(stderr=True, highlight=False)


class CliError(Exception):
    """A failure the command explains itself; `exit_code` is 1 or 2."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def usage(message: str) -> CliError:
    """The command line is wrong (exit 2)."""
    return CliError(message, EXIT_USAGE)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line a person should read about `exc`, and the exit code."""
    if isinstance(exc, CliError):
        return exc.message, exc.exit_code
    if isinstance(exc, UsageError):
        return _usage_line(exc), EXIT_USAGE
    from pydantic import ValidationError  # loaded already if this can be one

    if isinstance(exc, ValidationError):
        return _validation_line(exc), EXIT_USAGE
    if isinstance(exc, _INVALID):
        return exc.message, EXIT_USAGE
    if isinstance(exc, TesseraError):
        return exc.message, EXIT_FAILED
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    name = type(exc).__name__
    return f"internal error: {name}: {exc} (run again with --debug for the traceback)", EXIT_FAILED


def report(message: str) -> None:
    """Print `message` as exactly one line, whatever characters it holds."""
    # soft_wrap: a long message stays one line (the terminal may fold it;
    # rich must not insert newlines). escape: a name like "[red]" is text.
    err_console.print(f"[red]error:[/] {escape(one_line(message))}", soft_wrap=True)


def one_line(text: str) -> str:
    """`text` with newlines, other control characters and undecodable bytes escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _usage_line(exc: UsageError) -> str:
    hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
    # typer phrases a bad choice as a pydantic "Value error, ..."; the rest reads well
    return exc.format_message().replace("Value error, ", "") + hint


def _validation_line(exc: Any) -> str:
    """A pydantic ValidationError's errors, one `field: message` after another."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error.get("loc", ())) or "input"
        parts.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
