"""The README's strategy table lists exactly the registered strategies, as they declare themselves."""

from __future__ import annotations

import re
from pathlib import Path

from gradstore.selection.strategies import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def strategy_rows() -> dict[str, list[str]]:
    text = README.read_text()
    table = text[text.index("<!-- strategies:"):]
    rows = {}
    for line in table.splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[re.match(r"`([^`]+)`", cells[0]).group(1)] = cells
    return rows


def test_the_readme_strategy_table_matches_the_registry():
    rows = strategy_rows()
    assert list(rows) == list(registry())
    for name, cls in registry().items():
        _, needs, reads, *_ = rows[name]
        assert needs == cls.needs_targets
        assert reads == (", ".join(cls.features) or "—")
