"""The command lines the chart renders are accepted by the Tessera programs themselves.

A flag the chart passes and the program does not know would crash-loop every
pod of that component; this parses each rendered command line with the
program's own argument parser (the downward-API variables given node values).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable

import pytest

from tests.chart.chart import Doc, containers
from tests.chart.variants import VARIANTS

ENV = {"$(NODE_NAME)": "node-1", "$(NODE_IP)": "192.0.2.10"}


def _csi(argv: list[str]) -> argparse.Namespace:
    from csi_driver.__main__ import parse_args

    return parse_args(argv)


def _agent(argv: list[str]) -> argparse.Namespace:
    from node_agent.__main__ import parse_args

    return parse_args(argv)


def _management(argv: list[str]) -> argparse.Namespace:
    from management.__main__ import build_parser

    return build_parser().parse_args(argv)


PARSERS: dict[str, Callable[[list[str]], argparse.Namespace]] = {
    "tessera-csi": _csi,
    "tessera-node-agent": _agent,
    "tessera-management": _management,
}


def command_lines(docs: list[Doc]) -> list[tuple[str, list[str]]]:
    lines = []
    for workload, c in containers(docs, init=False):
        if c["args"][0] in PARSERS:
            argv = [arg for arg in c["args"][1:]]
            for var, value in ENV.items():
                argv = [arg.replace(var, value) for arg in argv]
            lines.append((f"{workload['metadata']['name']}/{c['name']}", [c["args"][0], *argv]))
    return lines


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_command_lines_parse_with_the_programs_own_flags(
    rendered: dict[str, list[Doc]], variant: str
) -> None:
    lines = command_lines(rendered[variant])
    assert {argv[0] for _, argv in lines} == set(PARSERS)
    refused = []
    for where, (program, *argv) in lines:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                PARSERS[program](argv)
        except SystemExit:
            refused.append(f"{where}: {stderr.getvalue().strip().splitlines()[-1]}")
    assert not refused, "\n".join(refused)
