"""The README documents every rule and every reason code that the code can produce."""

from __future__ import annotations

import re
from pathlib import Path

from bnfold.onnx import RULES
from bnfold.report import Reason
from bnfold.sources import TORCH_RULE_NAMES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_codes(heading: str) -> set[str]:
    """Backquoted names in the first column of the table under ``heading``."""
    section = README.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            rows.append(line.split("|")[1])
    return {code for row in rows for code in re.findall(r"`([^`]+)`", row)}


def test_every_rule_is_in_the_rule_table() -> None:
    documented = _table_codes("## Fold rules")
    names = {rule.name for rule in RULES} | set(TORCH_RULE_NAMES)
    assert names - documented == set()


def test_every_reason_code_is_explained() -> None:
    documented = _table_codes("### Why a BN is kept")
    assert {str(reason) for reason in Reason} - documented == set()
