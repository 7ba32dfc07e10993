"""The `tessera` command line, one module per concern.

- `main`: the root command, `--debug`, and where every failure is printed
- `failures`: exit codes and one-line errors
- `connect`: where management is (`--state-dir` or `--management`) and the client
- `output`: tables that never cut an ID, `-o wide|json|yaml`
- `volumes`, `inventory`, `reconcile`: the commands; `dev` comes from tessera_dev,
  found through the `tessera.cli` entry-point group (see `main`)
"""

from tessera.cli.main import app, main

__all__ = ["app", "main"]
