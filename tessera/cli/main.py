"""The `tessera` command: the root, `--debug`, and the one place failures are printed.

Typer runs in non-standalone mode so that every failure - click's usage
errors, management's problem documents, our own checks, a bug - comes back
here and is printed as one line with a meaningful exit code (see
`tessera.cli.failures`) instead of click's multi-line panels or a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

import tessera
from tessera.cli import inventory, reconcile, snapshots, volumes
from tessera.cli.failures import EXIT_FAILED, EXIT_OK, NoArgsIsHelpError, describe, report

HELP = """Tessera: NVMe-backed block volumes for Kubernetes.

A volume is given by its name or its ID wherever a command takes one.
Exit codes: 0 done; 1 the request failed (not found, refused by management,
management unreachable); 2 the command line is invalid (nothing was changed).
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    epilog=(
        "[bold]Examples[/]\n\n  tessera dev up --state-dir .state\n\n"
        "  tessera volume create db-data --size 10G\n\n  tessera volume show db-data -o yaml"
    ),
)


def _add_plugins(root: typer.Typer) -> None:
    """Sub-commands of the packages built on this one (`tessera dev` from tessera_dev).

    Found through the `tessera.cli` entry-point group, so the base package
    never imports the packages above it; one that is not installed is
    simply absent from `tessera --help`.
    """
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="tessera.cli"), key=lambda e: e.name):
        try:
            sub_app = entry.load()
        except ModuleNotFoundError as exc:
            if exc.name != entry.module.partition(".")[0]:
                raise  # the plugin is there but broken: say so
            continue  # metadata left behind by an uninstalled package
        root.add_typer(sub_app, name=entry.name)


_add_plugins(app)
app.add_typer(volumes.app, name="volume")
app.add_typer(snapshots.app, name="snapshot")
app.add_typer(inventory.node_app, name="node")
app.add_typer(inventory.pool_app, name="pool")
app.command("reconcile", epilog=reconcile.EPILOG)(reconcile.reconcile)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tessera {tessera.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="TESSERA_DEBUG",
            help="on failure, also print the Python traceback (for bug reports); "
            "accepted anywhere on the command line",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="print `tessera <version>` and exit",
        ),
    ] = False,
) -> None:
    """Options of the root; `main` takes `--debug` out of argv itself, so it works anywhere."""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _take_debug(args)
    sys.exit(run(args, debug=debug))


def run(args: list[str], *, debug: bool = False) -> int:
    """Run one command line; the exit code. Nothing escapes as a traceback unless `debug`."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="tessera", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        # `tessera` or `tessera volume` alone asks what there is: help, not an error.
        sys.stdout.write(exc.format_message())
        return EXIT_OK
    except BrokenPipeError:
        # `tessera volume list | head -1`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place that reports
        if debug:
            traceback.print_exception(exc)
        message, code = describe(exc)
        report(message)
        return code
    return result if isinstance(result, int) else EXIT_OK


def _take_debug(args: list[str]) -> bool:
    """Remove `--debug` from wherever it is (before `--`), as kubectl's global flags work."""
    end = args.index("--") if "--" in args else len(args)
    found = "--debug" in args[:end]
    if found:
        args[:] = [a for a in args[:end] if a != "--debug"] + args[end:]
    return found or os.environ.get("TESSERA_DEBUG", "") not in ("", "0", "false")
