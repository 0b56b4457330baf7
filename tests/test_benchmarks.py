"""Smoke test of benchmarks/compare_tools.py: its --quick path on one tiny synthetic model (no torch).

Asserts the table's shape and bnfold's own row, never timings or the other tools' results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_tools.py"
EXPECTED_COLUMNS = [
    "model",
    "tool",
    "result",
    "BN left",
    "valid",
    "total s",
    "load s",
    "fold s",
    "save s",
    "peak MB",
    "err max×",
    "err mean×",
    "lat noopt ms ×orig",
    "lat default ms ×orig",
]


def test_compare_tools_quick_run_on_a_tiny_model(tmp_path: Path) -> None:
    json_path = tmp_path / "rows.json"
    process = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--models",
            "convtranspose_grouped_bn",
            "--json",
            str(json_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]

    table = [line for line in process.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == EXPECTED_COLUMNS

    rows = json.loads(json_path.read_text())["rows"]
    tools = [row["tool"] for row in rows]
    assert tools[:2] == ["load+save", "bnfold"]
    assert {"onnxoptimizer", "onnxsim", "onnxslim", "onnxscript", "ort-basic"} <= set(tools)
    assert all(row["model"] == "convtranspose_grouped_bn" for row in rows)
    # A tool that is missing is a row that says so, not a crash.
    assert all(row["result"] != "not installed" or "bn_left" not in row for row in rows)

    bnfold = rows[tools.index("bnfold")]
    assert bnfold["result"] == "ok"
    assert (bnfold["bn_in"], bnfold["bn_left"]) == (1, 0)
    assert bnfold["valid"] is True
    assert bnfold["error_ratio_max"] < 10
    bnfold_line = next(line for line in table if "| bnfold " in line)
    assert [cell.strip() for cell in bnfold_line.strip("|").split("|")][2:5] == ["ok", "0/1", "yes"]
