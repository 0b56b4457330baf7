"""What a fold tells its user beyond the decisions: the before/after table, the JSON report's
version, files and digests, provenance written into the model, ``--json``, ``--simplify`` accounted
for, ``--benchmark``, progress on a terminal only, ``-v``.

Everything is read back from what was written (files, stdout, stderr) and checked against facts
computed here independently (op counts of the files, sha256 of their bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import Outcome, Summary
from tests.builders import bn_node, bn_params, conv_bn_model, make_model, run
from tests.test_cli import as_process, in_process


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(model.graph)
    return dict(counts)


def folded_and_kept_model() -> onnx.ModelProto:
    """x -> Conv -> BN -> y (folds) and x -> Relu -> BN -> z (kept: no layer to fold into)."""
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        bn_node("c", "y", prefix="bn_after_conv"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("r", "z", prefix="bn_after_relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 5, 5]) for name in ("y", "z")]
    initializers = [
        weight,
        *bn_params(rng, 4, prefix="bn_after_conv"),
        *bn_params(rng, 4, prefix="bn_after_relu"),
    ]
    return make_model(nodes, inputs, outputs, initializers)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(folded_and_kept_model(), path)
    return path


def table_rows(text: str) -> dict[str, list[str]]:
    """The before/after table of the CLI's output: first cell -> the other cells."""
    lines = text.splitlines()
    start = next(
        index for index, line in enumerate(lines) if line.split()[:4] == ["op", "before", "after", "change"]
    )
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        if cells[0] in ("parameters", "file"):
            continue
        rows[cells[0]] = cells[1:]
    return rows


# -- the before/after summary --------------------------------------------------------------------
def test_fold_prints_operator_counts_before_and_after_of_the_files(source, tmp_path):
    output = tmp_path / "folded.onnx"

    ran = as_process(source, "-o", output)

    assert ran.code == 0, ran.output
    before, after = op_counts(onnx.load(source)), op_counts(onnx.load(output))
    rows = table_rows(ran.stdout)
    for op in set(before) | set(after):
        expected = [str(before.get(op, 0)), str(after.get(op, 0))]
        change = after.get(op, 0) - before.get(op, 0)
        if change:
            expected.append(f"{change:+d}")
        assert rows[op] == expected, op
    assert rows["BatchNormalization"][:2] == ["2", "1"]
    assert rows["nodes"][:2] == [str(sum(before.values())), str(sum(after.values()))]
    assert "2 BatchNormalization: 1 folded, 1 kept" in ran.stdout


def test_json_report_has_version_files_digests_and_counts(source, tmp_path):
    output, report_path = tmp_path / "folded.onnx", tmp_path / "report.json"

    ran = as_process(source, "-o", output, "--report", report_path, "-q")

    assert ran.code == 0, ran.output
    report = json.loads(report_path.read_text())
    assert report["bnfold_version"] == bnfold.__version__
    assert report["inputs"] == [
        {"path": str(source), "bytes": source.stat().st_size, "sha256": sha256(source)}
    ]
    assert report["outputs"] == [
        {"path": str(output), "bytes": output.stat().st_size, "sha256": sha256(output)}
    ]
    assert report["summary"] == {"batchnorm": 2, "folded": 1, "kept": 1, "never_foldable": 0}
    assert report["model"]["before"]["op_counts"] == op_counts(onnx.load(source))
    assert report["model"]["after"]["op_counts"] == op_counts(onnx.load(output))
    assert report["model"]["after"]["file_bytes"] == output.stat().st_size
    assert report["model"]["before"]["parameter_bytes"] > report["model"]["after"]["parameter_bytes"]
    assert report["verification"]["passed"] is True


def untouched_weight_model() -> onnx.ModelProto:
    """x -> Conv(W) -> BN -> y (W is rewritten by the fold) and x -> Conv(V) -> z (V, over the 1 kB
    of a lazily loaded weight, is copied from the source file by byte range when the model is saved)."""
    rng = np.random.default_rng(3)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), name)
        for name in ("W", "V")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        bn_node("c", "y", prefix="bn"),
        helper.make_node("Conv", ["x", "V"], ["z"], pads=[1, 1, 1, 1], name="plain_conv"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 5, 5]) for name in ("y", "z")]
    return make_model(nodes, inputs, outputs, [*weights, *bn_params(rng, 8)])


def test_report_lists_the_digest_of_the_model_written_to_standard_output(tmp_path):
    source, report_path, as_file = tmp_path / "model.onnx", tmp_path / "report.json", tmp_path / "folded.onnx"
    onnx.save_model(untouched_weight_model(), source)
    command = [sys.executable, "-m", "bnfold.cli", str(source), "-o", "-"]

    streamed = subprocess.run([*command, "--report", str(report_path)], capture_output=True, timeout=120)
    to_file = as_process(source, "-o", as_file, "-q")

    assert streamed.returncode == 0 and to_file.code == 0, streamed.stderr.decode() + to_file.output
    written = streamed.stdout
    report = json.loads(report_path.read_text())
    assert report["outputs"] == [
        {"path": "-", "bytes": len(written), "sha256": hashlib.sha256(written).hexdigest()}
    ]
    assert report["model"]["after"]["file_bytes"] == len(written)
    assert written == as_file.read_bytes()  # the same model, whichever way it was written
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    for actual, expected in zip(
        run(onnx.load_from_string(written), {"x": x}), run(untouched_weight_model(), {"x": x}), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_report_lists_the_digest_of_the_model_written_to_a_fifo(tmp_path):
    # A FIFO (a pipe into another program) is written to directly, never replaced; the report's
    # digest is of the bytes that went through it.
    import threading

    source, report_path, fifo = tmp_path / "model.onnx", tmp_path / "report.json", tmp_path / "pipe"
    onnx.save_model(untouched_weight_model(), source)
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()

    ran = as_process(source, "-o", fifo, "--report", report_path, "-q")
    reader.join(timeout=60)

    assert ran.code == 0, ran.output
    (written,) = received
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the pipe
    report = json.loads(report_path.read_text())
    assert report["outputs"] == [
        {"path": str(fifo), "bytes": len(written), "sha256": hashlib.sha256(written).hexdigest()}
    ]
    assert "BatchNormalization" not in [node.op_type for node in onnx.load_from_string(written).graph.node]


def test_json_on_stdout_and_text_on_stderr_for_fold_and_verify(source, tmp_path):
    output = tmp_path / "folded.onnx"

    folded = as_process(source, "-o", output, "--json")
    checked = as_process("verify", source, output, "--json")
    quiet = as_process("verify", source, output, "--json", "-q")

    assert folded.code == 0 and checked.code == 0 and quiet.code == 0, folded.output + checked.output
    fold_report = json.loads(folded.stdout)
    assert fold_report["summary"]["folded"] == 1 and fold_report["outputs"][0]["sha256"] == sha256(output)
    assert "folded into conv by conv-bn" in folded.stderr and f"wrote {output}" in folded.stderr
    verify_report = json.loads(checked.stdout)
    assert verify_report["verification"]["passed"] is True
    assert verify_report["bnfold_version"] == bnfold.__version__
    assert "verification passed" in checked.stderr
    assert json.loads(quiet.stdout) == verify_report and quiet.stderr == ""


def test_summary_is_one_typed_value_for_text_and_json(source):
    report = bnfold.fold_onnx(source).report

    summary = report.summary()

    assert isinstance(summary, Summary)
    assert (summary.batchnorm, summary.folded, summary.kept) == (2, 1, 1)
    assert report.to_dict()["summary"] == summary.to_dict()
    assert str(summary) == "2 BatchNormalization: 1 folded, 1 kept" == summary
    assert report.to_text().splitlines()[-1] == str(summary)


# -- provenance ----------------------------------------------------------------------------------
def test_written_model_carries_metadata_and_node_doc_strings(source, tmp_path):
    model = onnx.load(source)
    (conv,) = [node for node in model.graph.node if node.op_type == "Conv"]
    conv.doc_string = "exported from layer1"
    helper.set_model_props(model, {"author": "someone", "bnfold.version": "0.0.0-stale"})
    onnx.save_model(model, source)
    output = tmp_path / "folded.onnx"

    ran = in_process(source, "-o", output, "-q")

    assert ran.code == 0, ran.output
    written = onnx.load(output)
    metadata = {prop.key: prop.value for prop in written.metadata_props}
    assert metadata["author"] == "someone"
    assert metadata["bnfold.version"] == bnfold.__version__
    assert metadata["bnfold.rules_applied"] == "conv-bn"
    assert metadata["bnfold.source_sha256"] == sha256(source)
    assert metadata["bnfold.source"] == "model.onnx"
    assert json.loads(metadata["bnfold.summary"]) == {
        "batchnorm": 2,
        "folded": 1,
        "kept": 1,
        "never_foldable": 0,
    }
    docs = {node.name: node.doc_string for node in written.graph.node}
    assert docs["conv"] == (
        "exported from layer1\nbnfold: absorbed BatchNormalization bn_after_conv (output y) by conv-bn"
    )
    assert docs["bn_after_relu"] == "" and docs["relu"] == ""


def if_model() -> onnx.ModelProto:
    """A Conv -> BN in each branch of an If; both branches name their nodes alike."""
    rng = np.random.default_rng(11)

    def branch(tag: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"W_{tag}")
        nodes = [
            helper.make_node("Conv", ["x", f"W_{tag}"], [f"c_{tag}"], name="conv"),
            bn_node(f"c_{tag}", f"y_{tag}", prefix=f"bn_{tag}"),
        ]
        out = helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, tag, [], [out], [weight, *bn_params(rng, 4, prefix=f"bn_{tag}")])

    nodes = [
        helper.make_node(
            "If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="pick"
        )
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])]
    return make_model(nodes, inputs, outputs, [])


def test_doc_strings_land_on_the_node_of_the_right_subgraph(tmp_path):
    source, output = tmp_path / "if.onnx", tmp_path / "folded.onnx"
    onnx.save_model(if_model(), source)

    result = bnfold.fold_file(source, output, provider="cpu")

    assert result.written
    (choose,) = onnx.load(output).graph.node
    branches = {attribute.name: attribute.g for attribute in choose.attribute}
    for tag in ("then", "else"):
        (conv,) = branches[f"{tag}_branch"].node
        assert conv.doc_string == f"bnfold: absorbed BatchNormalization bn_{tag} (output y_{tag}) by conv-bn"
    x = np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(
            run(onnx.load(output), feeds)[0], run(if_model(), feeds)[0], rtol=1e-5, atol=1e-5
        )


# -- --simplify: the report describes the written file -------------------------------------------
def test_simplify_removing_a_kept_bn_is_reported(tmp_path):
    pytest.importorskip("onnxsim")
    source, output = tmp_path / "model.onnx", tmp_path / "folded.onnx"
    onnx.save_model(conv_bn_model(), source)

    result = bnfold.fold_file(source, output, simplify=True, skip_rules=["conv-bn"], provider="cpu")

    written = onnx.load(output)
    assert "BatchNormalization" not in [node.op_type for node in written.graph.node]  # onnxsim fused it
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.SIMPLIFIED and decision.rule == "onnxsim"
    assert decision.reason is bnfold.Reason.RULE_DISABLED
    assert str(result.report.summary()) == (
        "1 BatchNormalization: 0 folded, 0 kept, 1 removed by --simplify (onnxsim)"
    )
    assert result.after is not None and result.after.op_counts == op_counts(written)
    assert result.verification is not None and result.verification.passed


# -- --benchmark ---------------------------------------------------------------------------------
def test_benchmark_reports_median_latency_before_and_after(source, tmp_path):
    report_path = tmp_path / "report.json"

    ran = in_process(source, "--dry-run", "--benchmark", "3", "--report", report_path)

    assert ran.code == 0, ran.output
    latency = json.loads(report_path.read_text())["latency"]
    assert latency["runs"] == 3 and latency["optimization_level"] == "default"
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert "median of 3 runs" in ran.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "report.json"]


# -- progress and logs ---------------------------------------------------------------------------
def run_with_terminal_stderr(*args: str | Path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout piped); return its code and stderr."""
    import pty

    leader, follower = pty.openpty()
    environment = {**os.environ, "BNFOLD_PROGRESS_DELAY": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bnfold.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=environment,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.communicate(timeout=120)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode()


def test_progress_shows_on_a_terminal_only(source, tmp_path):
    code, terminal = run_with_terminal_stderr(source, "-o", tmp_path / "a.onnx")
    quiet_code, quiet = run_with_terminal_stderr(source, "-o", tmp_path / "b.onnx", "-q")
    piped = subprocess.run(
        [sys.executable, "-m", "bnfold.cli", str(source), "-o", str(tmp_path / "c.onnx")],
        capture_output=True,
        text=True,
        env={**os.environ, "BNFOLD_PROGRESS_DELAY": "0"},
        timeout=120,
    )

    assert code == 0 and quiet_code == 0 and piped.returncode == 0, terminal + piped.stderr
    for step in (f"bnfold: loading {source} ... done in", "bnfold: folding ... done in", "bnfold: saving"):
        assert step in terminal
    assert "verifying" in terminal
    assert "bnfold:" not in quiet
    assert "bnfold:" not in piped.stderr


def test_progress_shows_each_verification_session_and_run(source, tmp_path):
    output = tmp_path / "folded.onnx"

    code, folding = run_with_terminal_stderr(source, "-o", output)
    verify_code, verifying = run_with_terminal_stderr("verify", source, output, "--exact-reference")

    assert code == 0 and verify_code == 0, folding + verifying
    shapes = "x=1x4x5x5"
    for terminal in (folding, verifying):
        steps = [
            "verifying: loading the original model into ONNX Runtime",
            f"verifying: run 1 of the original model ({shapes})",
            f"verifying: run 2 of the original model ({shapes})",
            "verifying: loading the folded model into ONNX Runtime",
            f"verifying: run 1 of the folded model ({shapes})",
            f"verifying: run 2 of the folded model ({shapes})",
        ]
        positions = [terminal.find(f"bnfold: {text} ... done in ") for text in steps]
        assert -1 not in positions and positions == sorted(positions), terminal
        # One line per step: no step's line is broken by another's.
        lines = [line for line in terminal.splitlines() if line.startswith("bnfold:")]
        assert lines and all(" ... done in " in line and line.endswith(" s") for line in lines), terminal
    assert "bnfold: verifying: evaluating the original model in float64 ... done in" in verifying
    assert "float64" not in folding  # within tolerance: no float64 evaluation was needed


def test_verbose_logs_steps_and_decisions(source, tmp_path):
    ran = as_process(source, "-o", tmp_path / "folded.onnx", "-v")

    assert ran.code == 0, ran.output
    assert "DEBUG" in ran.stderr and "folding" in ran.stderr
    debug = [line for line in ran.stderr.splitlines() if "DEBUG" in line]
    assert any("bn_after_conv" in line and "conv-bn" in line for line in debug), ran.stderr


def test_benchmark_with_the_model_on_standard_output(source, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "bnfold.cli", str(source), "-o", "-", "--benchmark", "2"],
        capture_output=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr.decode()
    written = onnx.load_from_string(completed.stdout)
    assert op_counts(written)["BatchNormalization"] == 1
    assert "median of 2 runs" in completed.stderr.decode()
