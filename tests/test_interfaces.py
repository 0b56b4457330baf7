"""Interfaces that fit habits: ``.npy`` inputs, ``bnfold rules`` and ``--skip-rule`` per model kind,
API errors worded with API parameters (the CLI's with flags), ``assert_equivalent``'s inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.core.table import ONNX, RULE_TABLE, rule_names
from tests.builders import conv_bn_model, make_model
from tests.test_cli import as_process, in_process


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_model(), path)
    return path


def two_input_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3]) for name in ("a", "b")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    return make_model(nodes, inputs, outputs, [])


# -- --inputs FILE.npy ---------------------------------------------------------------------------
def test_npy_inputs_feed_a_single_input_model(model_path, tmp_path):
    array = np.random.default_rng(1).standard_normal((3, 4, 7, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    report_path = tmp_path / "report.json"

    ran = as_process(
        model_path, "-o", tmp_path / "folded.onnx", "--inputs", tmp_path / "x.npy", "--report", report_path
    )

    assert ran.code == 0, ran.output
    verification = json.loads(report_path.read_text())["verification"]
    assert verification["passed"] is True
    assert verification["input_shapes"] == {"x": [3, 4, 7, 7]}


def test_npy_inputs_for_a_two_input_model_say_what_to_pass(tmp_path):
    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    onnx.save_model(two_input_model(), first)
    onnx.save_model(two_input_model(), second)
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))

    ran = in_process("verify", first, second, "--inputs", tmp_path / "a.npy")

    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert "2 inputs (a, b)" in line and "pass an .npz with one array per input name" in line


# -- rules and --skip-rule -----------------------------------------------------------------------
def test_rules_lists_every_rule_of_the_table():
    ran = in_process("rules")
    as_json = in_process("rules", "--json")

    assert ran.code == 0 and as_json.code == 0
    listed = [line.split()[0] for line in ran.stdout.splitlines()[2:]]
    assert listed == [info.name for info in RULE_TABLE]
    rows = json.loads(as_json.stdout)
    assert [row["name"] for row in rows] == [info.name for info in RULE_TABLE]
    assert {row["name"]: row["backends"] for row in rows}["linear-bn"] == ["torch"]


def test_fold_help_has_no_rule_choice_list():
    ran = in_process("fold", "--help")

    assert ran.code == 0
    text = " ".join(ran.stdout.split())  # click wraps the help
    assert "--skip-rule RULE" in text and "`bnfold rules` lists them" in text
    assert sum(name in ran.stdout for name in rule_names()) == 0


def test_skip_rule_unknown_on_an_onnx_model_names_the_onnx_rules(model_path, tmp_path):
    ran = in_process(model_path, "-o", tmp_path / "o.onnx", "--skip-rule", "conv-bm")

    assert ran.code == 2
    (error,) = [line for line in ran.stderr.splitlines() if line.startswith("Error:")]
    assert "'conv-bm' is not one of the ONNX rules" in error
    assert all(name in error for name in rule_names(ONNX)) and "linear-bn" not in error


# -- API errors name API parameters --------------------------------------------------------------
def test_api_errors_name_parameters_and_the_cli_names_flags(model_path):
    with pytest.raises(bnfold.InputSpecError) as raised:
        bnfold.verify(model_path, model_path, input_shapes={"nope": [1, 4, 7, 7]}, provider="cpu")
    message = str(raised.value)
    assert message.startswith("input_shapes names unknown input(s) ['nope']") and "--" not in message

    ran = in_process("verify", model_path, model_path, "--input-shape", "nope=1,4,7,7")

    assert ran.code == 2
    assert ran.stderr.startswith("bnfold: error: --input-shape names unknown input(s) ['nope']")


def test_api_inputs_mismatch_names_the_inputs_parameter(model_path):
    with pytest.raises(bnfold.InputSpecError) as raised:
        bnfold.verify(
            model_path, model_path, inputs={"y": np.zeros((1, 4, 7, 7), np.float32)}, provider="cpu"
        )
    assert str(raised.value).startswith("inputs do not match the model's inputs")


# -- assert_equivalent's inputs ------------------------------------------------------------------
def test_assert_equivalent_takes_arrays_lists_and_says_what_to_pass(tmp_path):
    torch = pytest.importorskip("torch")
    from bnfold.testing import assert_equivalent

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    example = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "model.onnx"
    bnfold.export(module, torch.from_numpy(example), path)

    for inputs in (example, [example], (example,), [torch.from_numpy(example)]):
        assert assert_equivalent(module, path, inputs).passed
    assert example.flags.writeable and example.base is None  # the caller's array is left alone

    for wrong, complaint in (
        ("x", "inputs is a str"),
        ([[1.0]], "inputs[0] is a list"),
        ((), "inputs is empty"),
    ):
        with pytest.raises(bnfold.InputSpecError) as raised:
            assert_equivalent(module, path, wrong)
        assert complaint in str(raised.value) and "numpy array" in str(raised.value)
