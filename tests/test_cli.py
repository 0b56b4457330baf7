"""The ``bnfold`` command end to end: in-process through click's CliRunner and as a real process.

Every test works on small models saved under ``tmp_path`` and asserts exact outcomes: the exit code,
what was (and was not) written, what was printed, and that the input file never changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import bnfold.cli
import bnfold.pipeline
from bnfold.cli import cli
from bnfold.verify import OutputComparison, VerificationResult
from tests.builders import conv_bn_model, gemm_bn_model, matmul_bn_model, op_types, run

CUDA_INSTALLED = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# -- running the command -------------------------------------------------------------------------
@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def in_process(*args) -> Ran:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    # The CLI turns every exception into an exit code; anything else escaping is a bug.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def as_process(*args, cwd: Path | None = None) -> Ran:
    completed = subprocess.run(
        [sys.executable, "-m", "bnfold.cli", *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return Ran(completed.returncode, completed.stdout, completed.stderr)


RUNNERS = [pytest.param(in_process, id="in-process"), pytest.param(as_process, id="subprocess")]


# -- files ---------------------------------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    """Every path under ``directory`` with its content hash: equal snapshots mean nothing written."""
    return {
        path.relative_to(directory).as_posix(): digest(path) if path.is_file() else "<dir>"
        for path in sorted(directory.rglob("*"))
    }


def temporary_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(".*.tmp"))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, path)
    return path


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save(conv_bn_model(), tmp_path / "model.onnx")


def x_feeds(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 4, 7, 7)).astype(np.float32)}


def perturb_conv_weight(model: onnx.ModelProto, amount: float = 1.0) -> None:
    """Add ``amount`` to one element of the Conv weight: a fold bug the verifier must catch."""
    (conv,) = [node for node in model.graph.node if node.op_type == "Conv"]
    (weight,) = [t for t in model.graph.initializer if t.name == conv.input[1]]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += amount
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))


def assert_equivalent_to_original(original: onnx.ModelProto, folded_path: Path) -> None:
    folded = onnx.load(folded_path)
    feeds = x_feeds()
    (expected,) = run(original, feeds)
    (actual,) = run(folded, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


# -- folding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("runner", RUNNERS)
def test_fold_writes_a_valid_folded_model_and_leaves_the_input_alone(runner, model_path, tmp_path):
    before = digest(model_path)
    output = tmp_path / "folded.onnx"

    ran = runner(model_path, "-o", output)

    assert ran.code == 0, ran.output
    assert ran.stderr == ""
    assert "conv-bn" in ran.stdout
    assert "1 BatchNormalization: 1 folded, 0 kept" in ran.stdout
    assert "verification passed" in ran.stdout
    assert f"wrote {output}" in ran.stdout
    folded = onnx.load(output)
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in op_types(folded)
    assert digest(model_path) == before
    assert_equivalent_to_original(conv_bn_model(), output)
    assert temporary_files(tmp_path) == []


@pytest.mark.parametrize(
    ("model", "rule", "target"),
    [
        (conv_bn_model(), "conv-bn", "Conv"),
        (conv_bn_model(transpose=True), "convtranspose-bn", "ConvTranspose"),
        (gemm_bn_model(), "gemm-bn", "Gemm"),
        (matmul_bn_model(), "matmul-bn", "MatMul"),
    ],
    ids=["conv", "convtranspose", "gemm", "matmul"],
)
def test_fold_names_the_rule_for_every_layer_kind(model, rule, target, tmp_path):
    path = save(model, tmp_path / "model.onnx")
    output = tmp_path / "folded.onnx"
    report_path = tmp_path / "report.json"

    ran = in_process(path, "-o", output, "--report", report_path)

    assert ran.code == 0, ran.output
    assert f"folded into {model.graph.node[0].name} by {rule}" in ran.stdout
    report = json.loads(report_path.read_text())
    assert [decision["rule"] for decision in report["decisions"]] == [rule]
    assert report["verification"]["passed"] is True
    folded = onnx.load(output)
    assert target in op_types(folded)
    assert "BatchNormalization" not in op_types(folded)


def test_json_report_has_summary_decisions_and_verification(model_path, tmp_path):
    report_path = tmp_path / "out.json"

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--report", report_path)

    assert ran.code == 0, ran.output
    report = json.loads(report_path.read_text())
    assert report["source"] == str(model_path)
    assert report["summary"] == {"batchnorm": 1, "folded": 1, "kept": 0, "never_foldable": 0}
    (decision,) = report["decisions"]
    assert decision["outcome"] == "folded"
    assert decision["rule"] == "conv-bn"
    assert decision["reason"] is None
    assert decision["node"] == "bn" and decision["into"] == "conv"
    verification = report["verification"]
    assert verification["passed"] is True
    assert verification["provider"] == "cpu" or CUDA_INSTALLED
    assert verification["input_source"] == "random"
    (output,) = verification["outputs"]
    assert output["name"] == "y"
    assert output["passed"] is True
    assert output["mismatched"] == 0
    assert 0.0 <= output["max_abs_error"] <= output["atol"]
    assert set(output) >= {"max_abs_error", "mean_abs_error", "max_rel_error", "atol", "rtol"}
    assert report["output"] == str(tmp_path / "folded.onnx")
    assert temporary_files(tmp_path) == []


def test_dry_run_writes_no_model_even_with_output(model_path, tmp_path):
    before = snapshot(tmp_path)

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--dry-run")

    assert ran.code == 0, ran.output
    assert "1 BatchNormalization: 1 folded, 0 kept" in ran.stdout
    assert "wrote" not in ran.stdout
    assert snapshot(tmp_path) == before


def test_dry_run_needs_no_output_and_still_writes_the_report(model_path, tmp_path):
    report_path = tmp_path / "report.json"

    ran = in_process(model_path, "--dry-run", "--report", report_path)

    assert ran.code == 0, ran.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "report.json"]
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is True
    assert "output" not in report


def test_no_verify_leaves_verification_out_of_the_report(model_path, tmp_path):
    report_path = tmp_path / "report.json"

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--no-verify", "--report", report_path)

    assert ran.code == 0, ran.output
    assert "verification" not in ran.stdout
    report = json.loads(report_path.read_text())
    assert "verification" not in report
    assert report["summary"]["folded"] == 1
    assert "BatchNormalization" not in op_types(onnx.load(tmp_path / "folded.onnx"))


def test_input_shape_sets_the_dynamic_batch(model_path, tmp_path):
    report_path = tmp_path / "report.json"

    ran = in_process(
        model_path, "-o", tmp_path / "folded.onnx", "--input-shape", "x=2,4,7,7", "--report", report_path
    )

    assert ran.code == 0, ran.output
    verification = json.loads(report_path.read_text())["verification"]
    assert verification["input_shapes"] == {"x": [2, 4, 7, 7]}
    assert verification["outputs"][0]["shape"] == [2, 6, 7, 7]
    assert "x=2x4x7x7" in ran.stdout


def test_inputs_npz_verifies_on_real_data(model_path, tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, **x_feeds(batch=3, seed=5))
    report_path = tmp_path / "report.json"

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--inputs", data, "--report", report_path)

    assert ran.code == 0, ran.output
    verification = json.loads(report_path.read_text())["verification"]
    assert verification["passed"] is True
    assert str(data) in verification["input_source"]
    assert verification["input_shapes"] == {"x": [3, 4, 7, 7]}


@pytest.mark.parametrize("runner", RUNNERS)
def test_output_may_be_the_input_path(runner, model_path, tmp_path):
    ran = runner(model_path, "-o", model_path, "-q")

    assert ran.code == 0, ran.output
    assert "BatchNormalization" not in op_types(onnx.load(model_path))
    assert_equivalent_to_original(conv_bn_model(), model_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_quiet_prints_nothing_on_success(runner, model_path, tmp_path):
    ran = runner(model_path, "-o", tmp_path / "folded.onnx", "-q")

    assert (ran.code, ran.stdout, ran.stderr) == (0, "", "")
    assert (tmp_path / "folded.onnx").exists()


def test_skip_rule_keeps_the_batchnorm_with_its_reason(model_path, tmp_path):
    report_path = tmp_path / "report.json"
    output = tmp_path / "folded.onnx"

    ran = in_process(model_path, "-o", output, "--skip-rule", "conv-bn", "--report", report_path)

    assert ran.code == 0, ran.output
    assert "1 BatchNormalization: 0 folded, 1 kept" in ran.stdout
    assert "rule-disabled" in ran.stdout
    (decision,) = json.loads(report_path.read_text())["decisions"]
    assert decision["outcome"] == "kept"
    assert decision["reason"] == "rule-disabled"
    assert decision["rule"] == "conv-bn"  # the rule that was disabled
    assert op_types(onnx.load(output)) == ["Conv", "BatchNormalization"]


def test_skipping_an_unrelated_rule_changes_nothing(model_path, tmp_path):
    ran = in_process(
        model_path, "-o", tmp_path / "folded.onnx", "--skip-rule", "gemm-bn", "--skip-rule", "matmul-bn"
    )

    assert ran.code == 0, ran.output
    assert "1 BatchNormalization: 1 folded, 0 kept" in ran.stdout


def test_rewrite_standalone_bn_flag(tmp_path):
    from tests.onnx.test_standalone import relu_bn_model

    model_path, output = tmp_path / "relu_bn.onnx", tmp_path / "folded.onnx"
    onnx.save(relu_bn_model(), model_path)
    ran = in_process(model_path, "--dry-run")
    assert ran.code == 0 and "0 folded, 1 kept" in ran.stdout

    ran = in_process(model_path, "-o", output, "--rewrite-standalone-bn")

    assert ran.code == 0, ran.output
    assert "rewritten" in ran.stdout and "verification passed" in ran.stdout
    assert op_types(onnx.load(output)) == ["Relu", "Mul", "Add"]
    # With the rule that would do it skipped, the BN stays, and says why.
    skipped = ("--skip-rule", "bn-to-affine")
    ran = in_process("inspect", model_path, "--rewrite-standalone-bn", *skipped, "--json")
    (decision,) = json.loads(ran.stdout)["decisions"]
    assert decision["outcome"] == "kept" and decision["reason"] == "no-foldable-producer"


def test_simplify_runs_onnxsim(model_path, tmp_path):
    pytest.importorskip("onnxsim")
    output = tmp_path / "folded.onnx"

    ran = in_process(model_path, "-o", output, "--simplify")

    assert ran.code == 0, ran.output
    folded = onnx.load(output)
    onnx.checker.check_model(folded)
    assert op_types(folded) == ["Conv"]
    assert_equivalent_to_original(conv_bn_model(), output)


def test_simplify_without_onnxsim_is_a_usage_error(model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # makes `import onnxsim` raise ImportError
    before = snapshot(tmp_path)

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--simplify")

    assert ran.code == 2, ran.output
    assert "bnfold[simplify]" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_existing_output_is_replaced(model_path, tmp_path):
    output = tmp_path / "folded.onnx"
    output.write_bytes(b"previous contents")

    ran = in_process(model_path, "-o", output, "-q")

    assert ran.code == 0, ran.output
    assert "BatchNormalization" not in op_types(onnx.load(output))
    assert temporary_files(tmp_path) == []


def test_written_files_follow_the_umask_not_mkstemps_0600(model_path, tmp_path):
    # mkstemp creates 0600 files; an output renamed from one must still get the usual mode.
    umask = os.umask(0o022)
    os.umask(umask)
    output = tmp_path / "folded.onnx"
    report_path = tmp_path / "report.json"

    ran = in_process(model_path, "-o", output, "--report", report_path, "-q")

    assert ran.code == 0, ran.output
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask
    assert report_path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- verification failures during a fold ---------------------------------------------------------
def _fold_that_breaks_the_weight(monkeypatch):
    real_fold = bnfold.pipeline.fold_onnx

    def broken_fold(*args, **kwargs):
        result = real_fold(*args, **kwargs)
        perturb_conv_weight(result.model, 1.0)
        return result

    monkeypatch.setattr(bnfold.pipeline, "fold_onnx", broken_fold)


def test_verification_mismatch_exits_1_and_writes_nothing(model_path, tmp_path, monkeypatch):
    _fold_that_breaks_the_weight(monkeypatch)
    output = tmp_path / "folded.onnx"
    report_path = tmp_path / "report.json"
    before = digest(model_path)

    ran = in_process(model_path, "-o", output, "--report", report_path)

    assert ran.code == 1, ran.output
    assert not output.exists()
    assert "FAILED" in ran.stderr
    assert "output not written" in ran.stderr
    assert "MISMATCH" in ran.stdout
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is False
    assert report["verification"]["outputs"][0]["mismatched"] > 0
    assert report["output"] is None
    assert digest(model_path) == before
    assert temporary_files(tmp_path) == []


def test_verification_mismatch_with_force_writes_but_still_exits_1(model_path, tmp_path, monkeypatch):
    _fold_that_breaks_the_weight(monkeypatch)
    output = tmp_path / "folded.onnx"

    ran = in_process(model_path, "-o", output, "--force")

    assert ran.code == 1, ran.output
    assert output.exists()
    assert "written anyway (--force)" in ran.stderr
    # What was written is the (broken) folded model, not the original.
    assert "BatchNormalization" not in op_types(onnx.load(output))
    assert temporary_files(tmp_path) == []


def test_failing_verification_result_exits_1(model_path, tmp_path, monkeypatch):
    failing = VerificationResult(
        outputs=[
            OutputComparison(
                name="y",
                dtype="float32",
                shape=[1, 6, 7, 7],
                passed=False,
                max_abs_error=0.5,
                mean_abs_error=0.01,
                max_rel_error=0.2,
                atol=1e-5,
                rtol=1e-4,
                needed_atol=0.5,
                mismatched=7,
            )
        ],
        provider="cpu",
        seed=0,
        input_shapes={"x": [1, 4, 7, 7]},
        input_source="random",
    )
    monkeypatch.setattr(bnfold.pipeline.Verifier, "compare", lambda self, *args, **kwargs: failing)
    output = tmp_path / "folded.onnx"

    ran = in_process(model_path, "-o", output, "-q")

    assert ran.code == 1
    assert ran.stdout == ""
    assert ran.stderr.strip() == (
        "bnfold: verification FAILED: 1 output(s) differ (y); worst max abs error 0.5 "
        "> atol 1e-05 + rtol 0.0001; output not written"
    )
    assert not output.exists()


def test_no_verify_skips_the_check_entirely(model_path, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("verify ran despite --no-verify")

    monkeypatch.setattr(bnfold.pipeline, "Verifier", must_not_run)

    ran = in_process(model_path, "-o", tmp_path / "folded.onnx", "--no-verify", "-q")

    assert ran.code == 0, ran.output


# -- inspect -------------------------------------------------------------------------------------
@pytest.mark.parametrize("runner", RUNNERS)
def test_inspect_prints_the_table_and_writes_nothing(runner, model_path, tmp_path):
    before = snapshot(tmp_path)

    ran = runner("inspect", model_path)

    assert ran.code == 0, ran.output
    lines = ran.stdout.splitlines()
    assert lines[0].split() == ["node", "op", "decision", "rule", "/", "reason"]
    assert lines[2].split()[:3] == ["bn", "BatchNormalization", "folded"]
    assert "folded into conv by conv-bn" in lines[2]
    assert lines[-1] == "1 BatchNormalization: 1 folded, 0 kept"
    assert snapshot(tmp_path) == before


def test_inspect_json_is_parseable(model_path, tmp_path):
    before = snapshot(tmp_path)

    ran = in_process("inspect", model_path, "--json")

    assert ran.code == 0, ran.output
    report = json.loads(ran.stdout)
    assert report["summary"] == {"batchnorm": 1, "folded": 1, "kept": 0, "never_foldable": 0}
    assert report["decisions"][0]["rule"] == "conv-bn"
    assert "verification" not in report
    assert snapshot(tmp_path) == before


def test_inspect_respects_skip_rule(model_path):
    ran = in_process("inspect", model_path, "--skip-rule", "conv-bn", "--json")

    assert ran.code == 0, ran.output
    assert json.loads(ran.stdout)["decisions"][0]["reason"] == "rule-disabled"


# -- verify --------------------------------------------------------------------------------------
@pytest.fixture
def model_pair(model_path, tmp_path):
    """(original, folded, broken): folded by the CLI; broken has one weight moved by 1.0."""
    folded = tmp_path / "folded.onnx"
    assert in_process(model_path, "-o", folded, "-q").code == 0
    broken_model = onnx.load(folded)
    perturb_conv_weight(broken_model, 1.0)
    broken = save(broken_model, tmp_path / "broken.onnx")
    return model_path, folded, broken


@pytest.mark.parametrize("runner", RUNNERS)
def test_verify_passes_an_equivalent_pair(runner, model_pair):
    original, folded, _ = model_pair

    ran = runner("verify", original, folded)

    assert ran.code == 0, ran.output
    assert "verification passed" in ran.stdout
    assert ran.stderr == ""


@pytest.mark.parametrize("runner", RUNNERS)
def test_verify_fails_a_broken_pair(runner, model_pair, tmp_path):
    original, _, broken = model_pair
    before = snapshot(tmp_path)

    ran = runner("verify", original, broken)

    assert ran.code == 1, ran.output
    assert "FAILED" in ran.stderr
    assert "Traceback" not in ran.output
    assert "MISMATCH" in ran.stdout
    assert snapshot(tmp_path) == before


def test_verify_huge_atol_passes_the_broken_pair(model_pair, tmp_path):
    original, _, broken = model_pair
    report_path = tmp_path / "verify.json"

    ran = in_process("verify", original, broken, "--atol", "1e6", "--report", report_path)

    assert ran.code == 0, ran.output
    (output,) = json.loads(report_path.read_text())["verification"]["outputs"]
    assert output["atol"] == 1e6
    assert output["passed"] is True
    assert output["max_abs_error"] > 0.1  # the pair does differ; only the tolerance let it pass


def test_verify_huge_rtol_passes_the_broken_pair(model_pair):
    original, _, broken = model_pair

    assert in_process("verify", original, broken, "--rtol", "1e6").code == 0


def test_verify_zero_tolerance_fails_the_rounded_pair(model_pair):
    # The fold reorders float arithmetic, so exact equality is too strict: proves atol/rtol are used.
    original, folded, _ = model_pair

    ran = in_process("verify", original, folded, "--atol", "0", "--rtol", "0", "--provider", "cpu")

    assert ran.code == 1, ran.output
    assert "atol 0 + rtol 0" in ran.stderr


def test_verify_a_model_against_itself_passes_exactly(model_path):
    ran = in_process("verify", model_path, model_path, "--atol", "0", "--rtol", "0", "--provider", "cpu")

    assert ran.code == 0, ran.output


def test_verify_report_json(model_pair, tmp_path):
    original, _, broken = model_pair
    report_path = tmp_path / "verify.json"

    ran = in_process("verify", original, broken, "--report", report_path, "-q")

    assert ran.code == 1
    assert ran.stdout == ""
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is False
    assert report["source"] == str(original)


def test_verify_models_with_different_inputs_is_a_usage_error(model_path, tmp_path):
    other = save(gemm_bn_model(), tmp_path / "other.onnx")

    ran = in_process("verify", model_path, other)

    assert ran.code == 2
    assert ran.stderr.startswith("bnfold: error: the models have different inputs")


# -- user errors: exit 2, one line, nothing written ----------------------------------------------
def _bad_input(name: str, contents: bytes | None):
    def setup(tmp_path: Path, model_path: Path):
        path = tmp_path / name
        if contents is None:
            path.mkdir()
        else:
            path.write_bytes(contents)
        return [path, "-o", tmp_path / "out.onnx"]

    return setup


def _truncated(tmp_path: Path, model_path: Path):
    data = model_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return [path, "-o", tmp_path / "out.onnx"]


def _with(*extra):
    def setup(tmp_path: Path, model_path: Path):
        return [model_path, "-o", tmp_path / "out.onnx", *extra]

    return setup


def _with_npz(**arrays):
    def setup(tmp_path: Path, model_path: Path):
        data = tmp_path / "data.npz"
        np.savez(data, **arrays)
        return [model_path, "-o", tmp_path / "out.onnx", "--inputs", data]

    return setup


def _missing_external_data(tmp_path: Path, model_path: Path):
    path = tmp_path / "external.onnx"
    onnx.save_model(
        conv_bn_model(), path, save_as_external_data=True, location="external.bin", size_threshold=0
    )
    (tmp_path / "external.bin").unlink()
    return [path, "-o", tmp_path / "out.onnx"]


RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
FLOAT_X = np.zeros((1, 4, 7, 7), np.float32)

USER_ERRORS = [
    # (id, setup(tmp_path, model_path) -> args, expected text, click usage error)
    (
        "missing-input",
        lambda tmp, model: [tmp / "nope.onnx", "-o", tmp / "out.onnx"],
        "nope.onnx: no such file",
        False,
    ),
    ("directory-input", _bad_input("dir.onnx", None), "is a directory", False),
    ("empty-file", _bad_input("empty.onnx", b""), "file is empty", False),
    ("text-file", _bad_input("text.onnx", b"this is not a model\n"), "not an ONNX model", False),
    ("random-bytes", _bad_input("random.onnx", RANDOM_BYTES), "random.onnx", False),
    ("truncated-onnx", _truncated, "truncated.onnx", False),
    ("missing-external-data", _missing_external_data, "external data", False),
    (
        "output-in-missing-directory",
        lambda tmp, model: [model, "-o", tmp / "missing" / "out.onnx"],
        "does not exist",
        False,
    ),
    ("output-is-a-directory", lambda tmp, model: [model, "-o", tmp], "is a directory", False),
    ("report-in-missing-directory", _with("--report", "/nonexistent-dir/r.json"), "does not exist", False),
    (
        "report-overwrites-input",
        lambda tmp, model: [model, "-o", tmp / "out.onnx", "--report", model],
        "would overwrite the model",
        False,
    ),
    (
        "report-overwrites-output",
        lambda tmp, model: [model, "-o", tmp / "out.onnx", "--report", tmp / "out.onnx"],
        "would overwrite the model",
        False,
    ),
    ("missing-output", lambda tmp, model: [model], "missing -o/--output", True),
    ("unknown-input-shape-name", _with("--input-shape", "z=1,4,7,7"), "unknown input(s) ['z']", False),
    ("bad-input-shape-syntax", _with("--input-shape", "x=a,b"), "dimensions must be integers", False),
    ("input-shape-without-equals", _with("--input-shape", "x"), "expected NAME=D1,D2", False),
    ("input-shape-wrong-rank", _with("--input-shape", "x=1,4,7"), "rank 3 given", False),
    ("input-shape-fixed-dim", _with("--input-shape", "x=1,5,7,7"), "the model fixes it", False),
    ("npz-missing-input", _with_npz(z=FLOAT_X), "missing ['x']", False),
    ("npz-wrong-dtype", _with_npz(x=FLOAT_X.astype(np.float64)), "dtype float64", False),
    ("npz-wrong-shape", _with_npz(x=np.zeros((1, 5, 7, 7), np.float32)), "shape [1, 5, 7, 7]", False),
    ("npz-missing-file", _with("--inputs", "/nonexistent-dir/data.npz"), "no such file", False),
    (
        "npz-not-npz",
        lambda tmp, model: [model, "-o", tmp / "out.onnx", "--inputs", model],
        "not a readable .npz file",
        False,
    ),
    ("unknown-skip-rule", _with("--skip-rule", "nope-bn"), "'nope-bn' is not one of", True),
    ("unknown-provider", _with("--provider", "tpu"), "'tpu' is not one of", True),
    ("unknown-option", _with("--frobnicate"), "No such option", True),
    ("negative-seed", _with("--seed", "-1"), "'--seed': -1 is not in the range", True),
    ("negative-atol", _with("--atol", "-1"), "'--atol': -1.0 is not a number >= 0", True),
    ("nan-rtol", _with("--rtol", "nan"), "'--rtol': nan is not a number >= 0", True),
]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    ("setup", "expected", "usage"),
    [pytest.param(setup, expected, usage, id=name) for name, setup, expected, usage in USER_ERRORS],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(
    runner, setup, expected, usage, model_path, tmp_path
):
    args = setup(tmp_path, model_path)
    before = snapshot(tmp_path)

    ran = runner(*args)

    assert ran.code == 2, ran.output
    assert "Traceback" not in ran.output
    assert ran.stdout == ""
    if usage:
        # click's usage errors: a usage line and a hint, then exactly one "Error:" line.
        errors = [line for line in ran.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, ran.stderr
        assert expected in errors[0]
    else:
        (line,) = ran.stderr.strip().splitlines()
        assert line.startswith("bnfold: error: ")
        assert expected in line
    assert snapshot(tmp_path) == before  # no output, no temporary files, inputs unchanged


@pytest.mark.skipif(CUDA_INSTALLED, reason="this onnxruntime has a CUDA provider")
@pytest.mark.parametrize("runner", RUNNERS)
def test_provider_cuda_without_cuda_is_a_usage_error(runner, model_path, tmp_path):
    before = snapshot(tmp_path)

    ran = runner(model_path, "-o", tmp_path / "out.onnx", "--provider", "cuda")

    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: error: ") and "CUDA" in line
    assert "Traceback" not in ran.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["inspect", "{tmp}/nope.onnx"], "no such file"),
        (["inspect", "{model}", "--report", "{model}"], "would overwrite the model"),
        (["verify", "{model}", "{tmp}/nope.onnx"], "no such file"),
        (["verify", "{tmp}/nope.onnx", "{model}"], "no such file"),
        (["verify", "{model}", "{model}", "--input-shape", "q=1"], "unknown input(s) ['q']"),
        (["verify", "{model}", "{model}", "--report", "{model}"], "would overwrite the model"),
    ],
)
def test_subcommand_user_errors(args, expected, model_path, tmp_path):
    args = [arg.format(tmp=tmp_path, model=model_path) for arg in args]
    before = snapshot(tmp_path)

    ran = in_process(*args)

    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: error: ") and expected in line
    assert snapshot(tmp_path) == before


def test_internal_error_exits_3_with_one_line(model_path, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(bnfold.pipeline, "fold_onnx", crash)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)

    ran = in_process(model_path, "-o", tmp_path / "out.onnx")

    assert ran.code == 3
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: internal error: ZeroDivisionError: boom")
    assert not (tmp_path / "out.onnx").exists()


# -- the module entry point ------------------------------------------------------------------------
def test_python_dash_m_runs_the_cli():
    ran = as_process("--version")

    assert ran.code == 0, ran.output
    assert ran.stdout.startswith("bnfold, version ")


@pytest.mark.parametrize("module", ["bnfold", "bnfold.console"])
def test_python_dash_m_bnfold_folds_like_the_command(module, model_path, tmp_path):
    # `python -m bnfold` where the environment's scripts are not on PATH; bnfold.console is the
    # command's own entry point (it used to do nothing when run with -m).
    version = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("bnfold, version "), version.stderr

    folded = subprocess.run(
        [sys.executable, "-m", module, str(model_path), "-o", str(tmp_path / "out.onnx"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert folded.returncode == 0, folded.stderr
    assert "BatchNormalization" not in op_types(onnx.load(tmp_path / "out.onnx"))


def test_help_lists_the_subcommands():
    ran = in_process("--help")

    assert ran.code == 0
    for command in ("fold", "inspect", "verify"):
        assert command in ran.stdout


def test_relative_paths_from_another_working_directory(model_path, tmp_path):
    ran = as_process("model.onnx", "-o", "folded.onnx", "--report", "report.json", "-q", cwd=tmp_path)

    assert ran.code == 0, ran.output
    assert json.loads((tmp_path / "report.json").read_text())["output"] == "folded.onnx"
    assert "BatchNormalization" not in op_types(onnx.load(tmp_path / "folded.onnx"))
