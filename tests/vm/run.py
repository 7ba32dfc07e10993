"""Run one command as root inside the test VM, in the project directory.

    .venv/bin/python -m tests.vm.run [--timeout S] [--results DIR] [--env K=V] -- CMD ARGS...

Builds the VM image first when the recipe changed (build/vm/, minutes the
first time), boots it, streams the console (the command's stdout and
stderr) to stdout and exits with the command's exit status (124: timed out,
125: the VM ended without reporting a status).  See docs/vm-tests.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.vm import vm


def main(args: list[str] | None = None) -> int:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m tests.vm.run", description=summary)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    parser.add_argument("--results", type=Path, help="keep the results share here")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="guest env")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no command given (… -- CMD ARGS...)")
    if (reason := vm.skip_reason()) is not None:
        print(f"tests.vm.run: cannot run the VM: {reason}", file=sys.stderr)
        return 77
    env = dict(kv.partition("=")[::2] for kv in ns.env)
    result = vm.run(command, timeout=ns.timeout, results=ns.results, env=env)
    if result.exit_code in (vm.TIMED_OUT, vm.NO_STATUS):
        tail = result.console_tail
        print(f"tests.vm.run: the kernel console's last lines:\n{tail}", file=sys.stderr)
    print(
        f"tests.vm.run: exit {result.exit_code} after {result.seconds}s "
        f"(guest setup {result.guest_setup_seconds}s, {result.accel}, {result.kernel})"
        + (" TIMED OUT" if result.timed_out else ""),
        file=sys.stderr,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
