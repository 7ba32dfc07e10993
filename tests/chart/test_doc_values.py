"""Every chart values snippet in docs/ installs: helm renders it through the schema.

A snippet is a ```yaml block or a `<<'YAML'` heredoc whose top-level keys
are all chart values (other YAML in the docs, manifests, is left alone).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import CHART, ROOT, Helm, write_values

BLOCK = re.compile(r"```ya?ml\n(.*?)```|<<'YAML'\n(.*?)\nYAML\n", re.DOTALL)
VALUE_KEYS = set(yaml.safe_load((CHART / "values.yaml").read_text()))


def snippets() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for n, match in enumerate(BLOCK.finditer(doc.read_text())):
            text = match.group(1) or match.group(2)
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(values, dict) and values and set(values) <= VALUE_KEYS:
                found.append((f"{doc.name}#{n}", values))
    return found


SNIPPETS = snippets()


def test_docs_hold_values_snippets() -> None:
    assert any(name.startswith("helm.md") for name, _ in SNIPPETS)


@pytest.mark.parametrize(("name", "values"), SNIPPETS, ids=[n for n, _ in SNIPPETS])
def test_values_snippet_in_docs_renders(
    helm: Helm, values_dir: Path, name: str, values: dict[str, Any]
) -> None:
    docs = helm.template(write_values(values_dir, values, "doc-" + name.replace("#", "-")))
    assert any(d["kind"] == "DaemonSet" for d in docs)
