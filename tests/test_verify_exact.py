"""Verification judged against the exact function, and verification that covers what was decided.

A numerically sensitive model (BN subtracting a large running mean, the cancellation real networks
have) makes the original's own float32 rounding exceed the default tolerance: the float64 judgment
must pass its correct fold, and every deliberately wrong fold (a weight off by 1%, a bias shifted, two
channels swapped) must fail in every mode.
"""

from __future__ import annotations

import importlib
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import cli
from bnfold.reference import evaluate_float64
from bnfold.verify import Verifier, verify
from tests.builders import make_model, run

verify_module = importlib.import_module("bnfold.verify")  # bnfold.verify is also the function
MODES = ("auto", "always", "strict")


def sensitive_model(
    depth: int = 8, channels: int = 16, offset: float = 1e3, seed: int = 0
) -> onnx.ModelProto:
    """Conv(+bias near ``offset``) -> BN(mean near ``offset``) -> activation, ``depth`` times.

    The BN cancels a large bias, so the original's float32 output carries rounding error of about
    ulp(offset) amplified through the chain, far above the default tolerance; the folded bias is
    computed in float64 and has no such cancellation.
    """
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "x"
    for index in range(depth):
        weight = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9) * 1.6
        values = {
            f"w{index}": weight,
            f"c{index}": rng.standard_normal(channels) * 0.1 + offset,
            f"g{index}": rng.uniform(0.5, 2.0, channels),
            f"b{index}": rng.standard_normal(channels) * 0.5,
            f"m{index}": rng.standard_normal(channels) * 0.5 + offset,
            f"v{index}": rng.uniform(0.5, 2.0, channels),
        }
        initializers += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()]
        nodes += [
            helper.make_node("Conv", [current, f"w{index}", f"c{index}"], [f"conv{index}"], pads=[1] * 4),
            helper.make_node(
                "BatchNormalization",
                [f"conv{index}", f"g{index}", f"b{index}", f"m{index}", f"v{index}"],
                [f"bn{index}"],
            ),
            helper.make_node("Relu" if index % 2 else "LeakyRelu", [f"bn{index}"], [f"act{index}"]),
        ]
        current = f"act{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], initializers)


@pytest.fixture(scope="module")
def sensitive_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    original = sensitive_model()
    return original, bnfold.fold_onnx(original).model


def corrupted(folded: onnx.ModelProto, kind: str, conv_index: int) -> onnx.ModelProto:
    """``folded`` with one conv wrong: weight x1.01, one channel's bias shifted, or two channels swapped."""
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    conv = [node for node in model.graph.node if node.op_type == "Conv"][conv_index]
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weight = numpy_helper.to_array(initializers[conv.input[1]]).copy()
    bias = numpy_helper.to_array(initializers[conv.input[2]]).copy()
    if kind == "weight-1.01":
        weight *= np.float32(1.01)
    elif kind == "bias-shift":
        bias[0] += np.float32(0.05)  # about a tenth of a typical folded bias here
    elif kind == "channel-swap":
        weight[[0, 1]] = weight[[1, 0]]
        bias[[0, 1]] = bias[[1, 0]]
    initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(weight, conv.input[1]))
    initializers[conv.input[2]].CopyFrom(numpy_helper.from_array(bias, conv.input[2]))
    return model


# -- the judgment ----------------------------------------------------------------------------------
def test_sensitive_correct_fold_is_over_tolerance_but_closer_to_the_exact_function(sensitive_pair):
    original, folded = sensitive_pair

    strict = verify(original, folded, provider="cpu", exact="strict")
    judged = verify(original, folded, provider="cpu")

    assert not strict, strict.to_text()  # today's check: the original's own rounding noise fails it
    output = judged.outputs[0]
    assert judged.passed, judged.to_text()
    assert output.within_tolerance is False and output.decided_by == "float64 reference"
    assert output.exact.folded_rms < output.exact.original_rms  # the float64 fold has no cancellation
    assert "(over tolerance), but is" in output.describe() and "closer to the float64" in output.describe()
    assert judged.reference["computed"] and judged.reference["seconds"] >= 0
    assert strict.reference is None and strict.outputs[0].exact is None


@pytest.mark.parametrize("kind", ["weight-1.01", "bias-shift", "channel-swap"])
def test_a_wrong_fold_fails_in_every_mode_on_every_conv(sensitive_pair, kind):
    original, folded = sensitive_pair
    for conv_index in range(8):
        wrong = corrupted(folded, kind, conv_index)
        for mode in MODES:
            result = verify(original, wrong, provider="cpu", exact=mode)
            assert not result, f"{kind} on conv {conv_index} passed with exact={mode}:\n{result.to_text()}"
            if mode != "strict":
                exact = result.outputs[0].exact
                assert exact is not None and exact.usable and not exact.passed
                assert "further from the float64 evaluation" in result.outputs[0].describe()


def test_always_shows_the_reference_next_to_a_tolerance_pass():
    original = sensitive_model(depth=2, offset=0.0)
    result = verify(original, bnfold.fold_onnx(original).model, provider="cpu", exact="always")

    output = result.outputs[0]
    assert result.passed and output.within_tolerance and output.decided_by == "tolerance"
    assert output.exact is not None and output.exact.passed
    assert f"{output.name}: differs from the original by" in result.to_text()


def test_given_tolerances_are_the_judge_unless_the_reference_is_asked_for(sensitive_pair):
    original, folded = sensitive_pair
    assert not verify(original, folded, provider="cpu", atol=1e-6, rtol=0.0)
    assert verify(original, folded, provider="cpu", atol=1e-6, rtol=0.0, exact="always")


def test_reference_skipped_for_an_operator_it_cannot_evaluate_says_what_to_pass(sensitive_pair):
    original, folded = sensitive_pair
    custom = onnx.ModelProto()
    custom.CopyFrom(original)
    custom.graph.node[-1].domain = "com.example"  # the final Identity, now a custom op
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    verifier = Verifier(original, provider="cpu", reference_source=custom)

    result = verifier.compare(folded)

    assert not result.passed and result.outputs[0].decided_by == "tolerance"
    skipped = result.reference["skipped"]
    assert "com.example" in skipped and "--atol" in skipped and "--inputs" in skipped
    assert "float64 reference skipped" in result.to_text()


def test_reference_skipped_when_the_model_is_over_the_size_limit(sensitive_pair):
    original, folded = sensitive_pair
    result = Verifier(original, provider="cpu", exact_limit_bytes=1000).compare(folded)
    assert not result.passed
    assert "limit" in result.reference["skipped"] and result.outputs[0].exact is None


def test_cli_writes_the_sensitive_fold_by_default_and_strict_refuses_it(sensitive_pair, tmp_path):
    original, _ = sensitive_pair
    source = tmp_path / "model.onnx"
    onnx.save(original, str(source))
    runner = CliRunner()

    default = runner.invoke(cli, [str(source), "-o", str(tmp_path / "out.onnx"), "--provider", "cpu"])
    strict = runner.invoke(cli, [str(source), "-o", str(tmp_path / "strict.onnx"), "--strict"])
    both = runner.invoke(cli, [str(source), "--dry-run", "--strict", "--exact-reference"])

    assert default.exit_code == 0, default.output
    assert "ok (float64 reference)" in default.stdout and "but is" in default.stdout
    assert (tmp_path / "out.onnx").exists()
    assert strict.exit_code == 1 and not (tmp_path / "strict.onnx").exists()
    assert both.exit_code == 2 and "contradict" in both.output


def test_cli_verify_fails_a_wrong_fold_and_says_by_how_much(sensitive_pair, tmp_path):
    original, folded = sensitive_pair
    onnx.save(original, str(tmp_path / "a.onnx"))
    onnx.save(corrupted(folded, "weight-1.01", 3), str(tmp_path / "b.onnx"))

    ran = CliRunner().invoke(cli, ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")])

    assert ran.exit_code == 1
    assert "further from the float64 evaluation than the original" in ran.stderr
    assert "allowed 4x the original's" in ran.stderr


# -- the float64 evaluator ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    transposed=st.booleans(),
    rank=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    kernel=st.integers(1, 3),
    pad=st.integers(0, 2),
    output_padding=st.integers(0, 1),
    auto_pad=st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER"]),
    seed=st.integers(0, 1000),
)
def test_float64_conv_and_conv_transpose_match_onnx_runtime(
    transposed, rank, group, stride, dilation, kernel, pad, output_padding, auto_pad, seed
):
    rng = np.random.default_rng(seed)
    spatial = [5 + i for i in range(rank)]
    channels_in, channels_out = 2 * group, 2 * group
    attributes = {"group": group, "strides": [stride] * rank, "dilations": [dilation] * rank}
    if auto_pad == "NOTSET":
        attributes["pads"] = [pad] * (2 * rank)
    else:
        attributes["auto_pad"] = auto_pad
        if transposed:
            attributes["dilations"] = [1] * rank  # ONNX Runtime computes SAME for dilation 1 only
    if transposed:
        weight_shape = [channels_in, channels_out // group, *[kernel] * rank]
        if output_padding < stride and output_padding < dilation:
            attributes["output_padding"] = [output_padding] * rank
    else:
        weight_shape = [channels_out, channels_in // group, *[kernel] * rank]
    weight = rng.standard_normal(weight_shape).astype(np.float32)
    bias = rng.standard_normal(channels_out).astype(np.float32)
    node = helper.make_node("ConvTranspose" if transposed else "Conv", ["x", "w", "b"], ["y"], **attributes)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels_in, *spatial])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [node],
        "g",
        [x_info],
        [y_info],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    x = rng.standard_normal([1, channels_in, *spatial]).astype(np.float32)
    try:
        expected = run(model, {"x": x})[0]
    except Exception:  # a combination ONNX Runtime refuses (empty output): nothing to compare
        return

    exact = evaluate_float64(model, [{"x": x}]).outputs[0][0]

    assert exact.dtype == np.float64 and exact.shape == expected.shape
    np.testing.assert_allclose(expected, exact, rtol=1e-4, atol=1e-4)


def test_float64_copy_rewrites_casts_and_constants():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32([3.0]), "k")),
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["x16"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x32", "k"], ["y"]),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    model = make_model(nodes, [x_info], [y_info], [])
    x = np.float32([1.0001, 2.0002, 1e-3])

    exact = evaluate_float64(model, [{"x": x}]).outputs[0][0]

    # No float16 rounding on the way: the exact function of the weights, in float64.
    np.testing.assert_array_equal(exact, x.astype(np.float64) * 3.0)


# -- coverage --------------------------------------------------------------------------------------
def batch_mixing_model(mixed: bool) -> onnx.ModelProto:
    """y = 2x, or (mixed) 2x + (sum over the batch of x - x): the same function only at batch 1."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["double"])]
    if mixed:
        nodes += [
            helper.make_node("ReduceSum", ["x", "axis0"], ["total"], keepdims=1),
            helper.make_node("Sub", ["total", "x"], ["others"]),
            helper.make_node("Add", ["double", "others"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["double"], ["y"]))
    initializers = [
        numpy_helper.from_array(np.float32([2.0]), "two"),
        numpy_helper.from_array(np.int64([0]), "axis0"),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return make_model(nodes, [x_info], [y_info], initializers)


def test_every_dynamic_dimension_runs_at_two_sizes_and_two_seeds():
    result = verify(batch_mixing_model(False), batch_mixing_model(True), provider="cpu")

    assert not result.passed  # equal at batch 1: the one-point check of old passed this
    assert [run["input_shapes"]["x"] for run in result.runs] == [[1, 4], [3, 4]]
    assert [run["seed"] for run in result.runs] == [0, 1]
    assert "covered: 2 run(s): x=1x4 (seed 0); x=3x4 (seed 1)" in result.to_text()


def test_given_shapes_get_a_second_size_too():
    result = verify(
        batch_mixing_model(False), batch_mixing_model(False), provider="cpu", input_shapes={"x": [5, 4]}
    )
    assert result.passed and [run["input_shapes"]["x"] for run in result.runs] == [[5, 4], [1, 4]]
    assert result.input_shapes == {"x": [5, 4]}


def test_a_second_size_the_model_rejects_is_reported_and_the_first_size_runs_twice():
    # A Reshape to a fixed size accepts batch 1 only, though the input declares N.
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    model = make_model(nodes, [x_info], [y_info], [numpy_helper.from_array(np.int64([2, 2]), "shape")])

    result = verify(model, model, provider="cpu")

    assert result.passed
    assert [run["input_shapes"]["x"] for run in result.runs] == [[1, 4], [1, 4]]
    assert [run["seed"] for run in result.runs] == [0, 1]
    assert any("x=3x4" in item and "rejects" in item for item in result.uncovered)


def if_model(condition_from_input: bool, else_scale: float = 3.0) -> onnx.ModelProto:
    def branch(name: str, scale: float) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        constant = numpy_helper.from_array(np.float32([scale]), f"{name}_scale")
        return helper.make_graph(
            [helper.make_node("Mul", ["x", f"{name}_scale"], [f"{name}_out"])], name, [], [out], [constant]
        )

    nodes = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
    if condition_from_input:
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        condition = "flag"
    else:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0))
        nodes.append(helper.make_node("Greater", ["largest", "big"], ["condition"]))
        condition = "condition"
    nodes.append(
        helper.make_node(
            "If", [condition], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", else_scale)
        )
    )
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, inputs, [y_info], [numpy_helper.from_array(np.float32(100.0), "big")])


def test_a_boolean_condition_input_takes_both_values():
    # The two models differ only in the else branch: a run with flag=False must happen.
    result = verify(if_model(True), if_model(True, else_scale=3.5), provider="cpu")
    assert not result.passed and not result.uncovered


def test_a_computed_condition_is_reported_as_not_covered():
    result = verify(if_model(False), if_model(False), provider="cpu")
    assert result.passed
    assert any("condition is computed" in item for item in result.uncovered)
    assert "not covered: If node(s)" in result.to_text()


# -- lean verification -------------------------------------------------------------------------------
def test_the_original_session_is_freed_before_the_folded_one_is_made(monkeypatch, sensitive_pair, tmp_path):
    original, folded = sensitive_pair
    live: list[weakref.ref] = []
    most = []
    real_session = verify_module.ort_session

    def counting(model, provider, role):
        session, used = real_session(model, provider, role)
        live.append(weakref.ref(session))
        most.append(sum(reference() is not None for reference in live))
        return session, used

    monkeypatch.setattr(verify_module, "ort_session", counting)
    onnx.save(original, str(tmp_path / "a.onnx"))
    onnx.save(folded, str(tmp_path / "b.onnx"))

    assert (
        CliRunner().invoke(cli, ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]).exit_code == 0
    )
    assert most == [1, 1]


def test_a_file_goes_to_onnx_runtime_by_path_and_a_copy_goes_to_tmpdir(monkeypatch, tmp_path):
    import tempfile

    copies = []
    real_save = verify_module.save_model

    def recording(model, path, **options):
        copies.append(Path(path))
        return real_save(model, path, **options)

    monkeypatch.setattr(verify_module, "save_model", recording)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    onnx.save(sensitive_model(depth=2, offset=0.0), str(tmp_path / "a.onnx"))

    assert verify(tmp_path / "a.onnx", tmp_path / "a.onnx", provider="cpu")
    assert copies == []  # by path: no copy of the model anywhere

    # A lazily loaded model (weights left in its file) is written out for ONNX Runtime: under TMPDIR.
    lazy = bnfold.load_model(tmp_path / "a.onnx", lazy=True).model
    assert verify(lazy, lazy, provider="cpu")
    assert len(copies) == 2 and all(path.is_relative_to(tmp_path / "tmp") for path in copies)

    # A file with more embedded weights than LEAN_BYTES is copied with external data (ONNX Runtime
    # maps those instead of parsing and copying them); one with external data goes by its path.
    monkeypatch.setattr(verify_module, "LEAN_BYTES", 1000)
    copies.clear()
    assert verify(tmp_path / "a.onnx", tmp_path / "a.onnx", provider="cpu")
    assert len(copies) == 2 and all(path.is_relative_to(tmp_path / "tmp") for path in copies)
    onnx.save(sensitive_model(depth=2, offset=0.0), str(tmp_path / "b.onnx"), save_as_external_data=True)
    copies.clear()
    assert verify(tmp_path / "b.onnx", tmp_path / "b.onnx", provider="cpu")
    assert copies == []


def test_a_folded_model_failing_on_a_size_the_original_runs_is_a_mismatch(tmp_path):
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["double"]),
        helper.make_node("Reshape", ["double", "shape"], ["y"]),  # batch 1 only
    ]
    initializers = [
        numpy_helper.from_array(np.float32([2.0]), "two"),
        numpy_helper.from_array(np.int64([1, 4]), "shape"),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    folded = make_model(nodes, [x_info], [y_info], initializers)
    onnx.save(batch_mixing_model(False), str(tmp_path / "a.onnx"))
    onnx.save(folded, str(tmp_path / "b.onnx"))

    result = verify(tmp_path / "a.onnx", tmp_path / "b.onnx", provider="cpu")
    ran = CliRunner().invoke(cli, ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")])

    assert not result and "the folded model fails on x=3x4, which the original runs" in result.outputs[0].note
    assert ran.exit_code == 1, ran.output
    assert "differ (y): the folded model fails on x=3x4" in ran.stderr


def test_a_loop_is_reported_as_run_with_the_inputs_iteration_counts():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["condition_in"], ["condition_out"]),
            helper.make_node("Add", ["carried_in", "one"], ["carried_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, [2]),
        ],
        [numpy_helper.from_array(np.float32([1.0]), "one")],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="repeat")]
    inputs = [
        helper.make_tensor_value_info("trips", TensorProto.INT64, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [])

    result = verify(model, model, provider="cpu")

    assert result.passed
    assert any(item.startswith("Loop/Scan node(s) repeat:") for item in result.uncovered)


@settings(max_examples=30, deadline=None)
@given(
    rank=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    pad=st.integers(0, 1),
    ceil=st.booleans(),
    auto_pad=st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]),
    size=st.integers(3, 9),
    seed=st.integers(0, 1000),
)
def test_float64_max_pool_matches_onnx_runtime(
    rank, kernel, stride, dilation, pad, ceil, auto_pad, size, seed
):
    attributes = {"kernel_shape": [kernel] * rank, "strides": [stride] * rank, "ceil_mode": int(ceil)}
    if auto_pad == "NOTSET":
        attributes["pads"] = [min(pad, kernel - 1)] * (2 * rank)
        attributes["dilations"] = [dilation] * rank
    else:
        attributes["auto_pad"] = auto_pad
    shape = [1, 2, *[size + i for i in range(rank)]]
    model = make_model(
        [helper.make_node("MaxPool", ["x"], ["y"], **attributes)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        expected = run(model, {"x": x})[0]
    except Exception:  # a combination ONNX Runtime refuses: nothing to compare
        return

    exact = evaluate_float64(model, [{"x": x}]).outputs[0][0]

    assert exact.shape == expected.shape
    np.testing.assert_array_equal(exact, expected.astype(np.float64))  # max of the same values


def test_float64_max_pool_window_wider_than_the_input_gives_one_output_as_onnx_runtime_does():
    # Found by the property test above in CI: kernel 3 dilated by 2 spans 5 > 4 inputs. The ONNX
    # formula's floor gives no output; ONNX Runtime divides toward zero and pools the taps inside.
    attributes = {"kernel_shape": [3], "strides": [2], "dilations": [2], "pads": [0, 0]}
    model = make_model(
        [helper.make_node("MaxPool", ["x"], ["y"], **attributes)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    x = np.float32([[[1, 9, 3, 4], [-5, 0, -2, 7]]])

    exact = evaluate_float64(model, [{"x": x}]).outputs[0][0]

    np.testing.assert_array_equal(exact, [[[3.0], [-2.0]]])  # max of taps 0 and 2
    np.testing.assert_array_equal(exact, run(model, {"x": x})[0])


def test_float64_copy_keeps_scalar_constants_scalar():
    # A Constant scalar that became [1] broke a Concat of shapes (TF-style dynamic padding).
    nodes = [
        helper.make_node(
            "Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32), "half")
        ),
        helper.make_node("Mul", ["x", "half"], ["y"]),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = make_model(nodes, [x_info], [y_info], [])
    exact = evaluate_float64(model, [{"x": np.array(3.0, np.float32)}]).outputs[0][0]
    assert exact.shape == () and exact == 1.5


def test_where_the_original_overflows_the_fold_is_judged_on_the_other_elements():
    # An If branch run on values it never gets (a local check), or inputs near the dtype's limit:
    # the float32 original is inf where the float64 value is finite; that is the original's own
    # error, so a folded value there is no further, and the rest decides.
    from bnfold.comparison import compare_output, judge_against_reference

    reference = np.array([1.0, 2.0, 3.5e38, -4.0])  # the third is past float32's largest number
    original = np.array([1.0, 2.0, np.inf, -4.0], np.float32)
    close = np.array([1.0000001, 2.0, 3.3e38, -4.0], np.float32)
    wrong = np.array([1.01, 2.0, np.inf, -4.0], np.float32)
    overflows_more = np.array([np.inf, 2.0, np.inf, -4.0], np.float32)

    judged = judge_against_reference(compare_output("y", original, close), reference, original, close)
    assert judged.passed and judged.decided_by == "float64 reference"
    assert "the original overflows at 1 element(s), judged on the others" in judged.exact.describe()
    for folded in (wrong, overflows_more):
        judged = judge_against_reference(compare_output("y", original, folded), reference, original, folded)
        assert not judged.passed, judged.exact.describe()
    assert "the folded model overflows at 1 element(s) where the original does not" in judged.exact.describe()

    everywhere = np.full(2, np.inf, np.float32)
    judged = judge_against_reference(
        compare_output("y", everywhere, np.zeros(2, np.float32)),
        np.array([1.0, 2.0]),
        everywhere,
        np.zeros(2, np.float32),
    )
    assert not judged.passed and not judged.exact.usable  # nothing left to judge by: the tolerance decides
