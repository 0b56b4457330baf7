"""The README documents every rule and every reason code that the code can produce, and the rule
table it shows is the one the code uses (:data:`bnfold.core.table.RULE_TABLE`)."""

from __future__ import annotations

import re
from pathlib import Path

from bnfold.core.table import ONNX, RULE_TABLE, rule_names
from bnfold.onnx import RULES
from bnfold.report import Reason
from bnfold.sources import TORCH_RULE_NAMES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_rows(heading: str) -> list[list[str]]:
    """The cells of the rows of the table under ``heading`` whose first cell is backquoted."""
    section = README.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def _table_codes(heading: str) -> set[str]:
    """Backquoted names in the first column of the table under ``heading``."""
    return {code for row in _table_rows(heading) for code in re.findall(r"`([^`]+)`", row[0])}


def test_every_rule_is_in_the_rule_table() -> None:
    documented = _table_codes("## Fold rules")
    names = {rule.name for rule in RULES} | set(TORCH_RULE_NAMES)
    assert names - documented == set()


def test_the_readme_rule_table_is_the_code_rule_table() -> None:
    """Every README row names rules of the table, with the pattern the table gives them."""
    rows = _table_rows("## Fold rules")
    documented = set()
    patterns = {info.name: info.pattern for info in RULE_TABLE}
    for row in rows:
        names = re.findall(r"`([^`]+)`", row[0])
        for name in names:
            assert name in patterns, f"README documents `{name}`, which the rule table lacks"
            assert patterns[name] == row[1], f"`{name}`: README pattern {row[1]!r}, table {patterns[name]!r}"
        documented.update(names)
    assert set(patterns) == documented


def test_each_backend_registry_is_its_part_of_the_rule_table() -> None:
    assert tuple(rule.name for rule in RULES) == rule_names(ONNX)


def test_every_reason_code_is_explained() -> None:
    documented = _table_codes("### Why a BN is kept")
    assert {str(reason) for reason in Reason} - documented == set()
