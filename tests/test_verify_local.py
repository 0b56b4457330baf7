"""Folds inside subgraphs that end-to-end runs never reach are checked locally (bnfold.verify_local).

Each model here hides a Conv -> BN where no verification input runs it: the branch of an ``If`` whose
condition is computed (and never true for these inputs), a ``Loop`` whose trip count is computed as 0,
an ``If`` nested in a loop body. A correct fold passes and is reported as checked locally; the same
fold with one weight scaled by 1.01 fails (API, ``bnfold verify`` and ``bnfold MODEL -o OUT``: exit 1,
nothing written), though every end-to-end output still matches.
"""

from __future__ import annotations

import importlib
import json
import weakref

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold.pipeline as pipeline_module
from bnfold import fold_onnx, verify
from bnfold.cli import cli
from bnfold.verify import Verifier
from tests.builders import bn_node, bn_params, make_model, tensor

verify_module = importlib.import_module("bnfold.verify")  # bnfold.verify is also the function

CHANNELS = 3


def conv_bn_graph(name: str, source: str, output: str, seed: int, extra_nodes=(), extra_inputs=()):
    """``output = BN(Conv(source, W))``, ``W`` read from the enclosing scope, BN parameters its own."""
    rng = np.random.default_rng(seed)
    nodes = [
        *extra_nodes,
        helper.make_node("Conv", [source, "W"], [f"{name}_h"], name=f"{name}_conv"),
        bn_node(f"{name}_h", output, prefix=f"{name}_bn"),
    ]
    return helper.make_graph(
        nodes,
        name,
        list(extra_inputs),
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        bn_params(rng, CHANNELS, prefix=f"{name}_bn"),
    )


def never_true(source: str, output: str, prefix: str) -> list:
    """``output = ReduceSum(source) > 1e9``: computed, and False for every verification input."""
    return [
        helper.make_node("ReduceSum", [source], [f"{prefix}_sum"], keepdims=0),
        helper.make_node("Greater", [f"{prefix}_sum", "big"], [output]),
    ]


def identity_graph(name: str, source: str, output: str):
    return helper.make_graph(
        [helper.make_node("Identity", [source], [output])],
        name,
        [],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
    )


def shared_initializers(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        tensor("W", rng.standard_normal((CHANNELS, CHANNELS, 1, 1)), np.float32),
        tensor("big", np.array(1e9), np.float32),
    ]


def model_with(nodes, output: str = "y"):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 4, 4])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", CHANNELS, 4, 4])]
    return make_model(nodes, inputs, outputs, shared_initializers())


def untaken_branch_model():
    """``y = If(sum(x) > 1e9, then: BN(Conv(x)), else: x)``: the then-branch never runs."""
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="gate",
        then_branch=conv_bn_graph("then", "x", "then_out", 1),
        else_branch=identity_graph("else", "x", "else_out"),
    )
    return model_with([*never_true("x", "cond", "gate"), node])


def loop_body(name: str, nested=None):
    """A loop body ``v_out = BN(Conv(v))`` (or the ``nested`` nodes producing ``v_out``)."""
    formal = [
        helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
        helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", CHANNELS, 4, 4]),
    ]
    if nested is None:
        return conv_bn_graph(
            name,
            "v",
            "v_out",
            2,
            extra_nodes=[helper.make_node("Identity", ["condition_in"], ["condition_out"])],
            extra_inputs=formal,
        )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["condition_in"], ["condition_out"]), *nested],
        name,
        formal,
        [helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
    )
    return graph


def with_condition_output(graph):
    """The body's outputs: the condition, then ``v_out`` with its rank (Loop's shape inference needs one)."""
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", CHANNELS, 4, 4]),
        ]
    )
    return graph


def zero_trip_loop_model():
    """``y = Loop(trips, v=x)`` with ``trips`` computed as 0: the body never runs end to end."""
    trips = [
        *never_true("x", "run", "trips"),
        helper.make_node("Cast", ["run"], ["trips"], to=TensorProto.INT64),
    ]
    node = helper.make_node(
        "Loop", ["trips", "", "x"], ["y"], name="repeat", body=with_condition_output(loop_body("body"))
    )
    return model_with([*trips, node])


def nested_if_in_loop_model():
    """A Loop that runs twice; in its body an If whose computed condition never holds."""
    inner = helper.make_node(
        "If",
        ["inner_cond"],
        ["v_out"],
        name="inner",
        then_branch=conv_bn_graph("then", "v", "then_out", 3),
        else_branch=identity_graph("else", "v", "else_out"),
    )
    body = with_condition_output(loop_body("body", nested=[*never_true("v", "inner_cond", "inner"), inner]))
    trips = helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(np.array(2, np.int64)))
    node = helper.make_node("Loop", ["trips", "", "x"], ["y"], name="repeat", body=body)
    return model_with([trips, node])


def corrupted(model, *attributes: str, factor: float = 1.01, change=None):
    """A copy of ``model`` with the Conv in the subgraph ``attributes`` leads to (each the attribute
    of the first node holding it) made wrong: its weight scaled by ``factor``, or its initializers
    ``(weight, bias)`` replaced by what ``change(weight, bias)`` returns."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for name in attributes:
        holder = next(node for node in graph.node if any(entry.name == name for entry in node.attribute))
        graph = next(entry.g for entry in holder.attribute if entry.name == name)
    conv = next(node for node in graph.node if node.op_type == "Conv")
    tensors = [
        next(tensor for tensor in graph.initializer if tensor.name == name) for name in conv.input[1:3]
    ]
    values = [numpy_helper.to_array(tensor) for tensor in tensors]
    if change is None:
        values[0] = values[0] * np.float32(factor)
    else:
        values = list(change(*values))
    for stored, value in zip(tensors, values, strict=True):
        stored.CopyFrom(numpy_helper.from_array(value.astype(np.float32), stored.name))
    return copy


def checks_by_label(result):
    return {check.subgraph: check for check in result.local}


# -- If: the branch the inputs never select -----------------------------------------------------------
def test_a_correct_fold_in_an_untaken_branch_passes_and_is_checked_locally():
    original = untaken_branch_model()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    result = verify(original, folded.model, provider="cpu")

    assert result.passed
    checks = checks_by_label(result)
    assert checks["If node gate then-branch"].status == "checked"
    assert checks["If node gate then-branch"].runs == 2
    assert checks["If node gate else-branch"].status == "unchanged"
    text = result.to_text()
    assert "covered locally: If node gate then-branch: checked locally on captured values (2 run(s))" in text
    assert not any("If node(s) gate" in item for item in result.uncovered)
    as_json = json.loads(json.dumps(result.to_dict()))
    assert {entry["subgraph"]: entry["status"] for entry in as_json["local"]} == {
        "If node gate then-branch": "checked",
        "If node gate else-branch": "unchanged",
    }


def test_a_corrupted_fold_in_an_untaken_branch_fails_though_every_output_matches():
    original = untaken_branch_model()
    wrong = corrupted(fold_onnx(original).model, "then_branch")

    result = verify(original, wrong, provider="cpu")

    assert all(output.passed for output in result.outputs)  # end to end, nothing shows
    assert not result.passed and not result
    check = checks_by_label(result)["If node gate then-branch"]
    assert [output.name for output in check.outputs if not output.passed] == ["then_out"]
    assert "If node gate then-branch: then_out" in result.to_text()
    assert "MISMATCH in then_out" in result.to_text()
    assert result.to_dict()["passed"] is False


@pytest.mark.parametrize("exact", ["auto", "always", "strict"])
def test_a_corrupted_untaken_branch_fails_in_every_judgment_mode(exact):
    original = untaken_branch_model()
    wrong = corrupted(fold_onnx(original).model, "then_branch")
    assert not verify(original, wrong, provider="cpu", exact=exact).passed


def test_cli_verify_fails_a_corrupted_untaken_branch_and_names_it(tmp_path):
    original = untaken_branch_model()
    onnx.save(original, str(tmp_path / "a.onnx"))
    onnx.save(corrupted(fold_onnx(original).model, "then_branch"), str(tmp_path / "b.onnx"))

    ran = CliRunner().invoke(cli, ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")])

    assert ran.exit_code == 1, ran.output
    assert "If node gate then-branch" in ran.output
    assert "MISMATCH in then_out" in ran.output


def corrupting_fold(monkeypatch, *attributes: str) -> None:
    """Make the file pipeline's fold write a wrong weight into the subgraph ``attributes``."""
    real = pipeline_module.fold_onnx

    def wrong_fold(model, **options):
        result = real(model, **options)
        result.model.CopyFrom(corrupted(result.model, *attributes))
        return result

    monkeypatch.setattr(pipeline_module, "fold_onnx", wrong_fold)


@pytest.mark.parametrize(
    ("build", "attributes"),
    [
        (untaken_branch_model, ("then_branch",)),
        (zero_trip_loop_model, ("body",)),
        (nested_if_in_loop_model, ("body", "then_branch")),
    ],
)
def test_cli_fold_with_a_corrupted_subgraph_fold_exits_1_and_writes_nothing(
    monkeypatch, tmp_path, build, attributes
):
    source, output = tmp_path / "model.onnx", tmp_path / "folded.onnx"
    onnx.save(build(), str(source))
    corrupting_fold(monkeypatch, *attributes)

    ran = CliRunner().invoke(cli, [str(source), "-o", str(output), "--provider", "cpu"])

    assert ran.exit_code == 1, ran.output
    assert "checked locally" in ran.output and "MISMATCH" in ran.output
    assert not output.exists()


def test_cli_fold_of_an_untaken_branch_writes_the_verified_model(tmp_path):
    source, output = tmp_path / "model.onnx", tmp_path / "folded.onnx"
    onnx.save(untaken_branch_model(), str(source))

    ran = CliRunner().invoke(cli, [str(source), "-o", str(output), "--provider", "cpu", "--json"])

    assert ran.exit_code == 0, ran.output
    assert output.exists()
    report = json.loads(ran.stdout)
    local = report["verification"]["local"]
    assert ("If node gate then-branch", "checked", True) in [
        (entry["subgraph"], entry["status"], entry["passed"]) for entry in local
    ]


# -- Loop bodies ------------------------------------------------------------------------------------
def test_a_loop_body_that_never_runs_is_checked_locally_at_iteration_zero():
    original = zero_trip_loop_model()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    good = verify(original, folded.model, provider="cpu")
    bad = verify(original, corrupted(folded.model, "body"), provider="cpu")

    assert good.passed
    assert checks_by_label(good)["Loop node repeat body"].status == "checked"
    assert "covered locally: Loop node repeat body" in good.to_text()
    assert all(output.passed for output in bad.outputs)
    assert not bad.passed
    assert not checks_by_label(bad)["Loop node repeat body"].passed


def test_an_if_nested_in_a_loop_body_is_checked_from_values_captured_in_the_body():
    original = nested_if_in_loop_model()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    good = verify(original, folded.model, provider="cpu")
    bad = verify(original, corrupted(folded.model, "body", "then_branch"), provider="cpu")

    nested = "Loop node repeat body > If node inner then-branch"
    assert good.passed
    assert checks_by_label(good)[nested].status == "checked"
    assert checks_by_label(good)["Loop node repeat body"].status == "checked"
    assert all(output.passed for output in bad.outputs)
    assert not bad.passed
    assert not checks_by_label(bad)[nested].passed
    assert checks_by_label(bad)["Loop node repeat body"].passed  # iteration 0 takes the else branch


# -- Scan bodies ------------------------------------------------------------------------------------
def scan_model():
    """``Scan`` over the batch axis of ``x`` with a state; the body is ``s_out = BN(Conv(s + slice))``,
    whose output the model drops (only the scanned-out identity is a graph output)."""
    rng = np.random.default_rng(4)
    body = helper.make_graph(
        [
            helper.make_node("Add", ["state", "slice"], ["sum"]),
            helper.make_node("Unsqueeze", ["sum", "zero"], ["batched"]),
            helper.make_node("Conv", ["batched", "W"], ["body_h"], name="body_conv"),
            bn_node("body_h", "bn_out", prefix="body_bn"),
            helper.make_node("Squeeze", ["bn_out", "zero"], ["state_out"]),
            helper.make_node("Identity", ["slice"], ["scanned_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("state", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("slice", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scanned_out", TensorProto.FLOAT, None),
        ],
        [*bn_params(rng, CHANNELS, prefix="body_bn"), tensor("zero", np.array([0]), np.int64)],
    )
    initial = helper.make_node(
        "Constant", [], ["initial"], value=tensor("initial_value", np.ones((CHANNELS, 4, 4)), np.float32)
    )
    node = helper.make_node(
        "Scan", ["initial", "x"], ["final", "y"], name="scan", body=body, num_scan_inputs=1
    )
    return model_with([initial, node])


def test_a_scan_body_is_checked_on_its_first_slice():
    original = scan_model()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    good = verify(original, folded.model, provider="cpu")
    bad = verify(original, corrupted(folded.model, "body"), provider="cpu")

    assert good.passed and checks_by_label(good)["Scan node scan body"].status == "checked"
    assert all(output.passed for output in bad.outputs)  # the state is not a graph output
    assert not bad.passed


# -- what cannot be checked stays uncovered ----------------------------------------------------------
def sequence_branch_model():
    """The then-branch reads a sequence from the enclosing graph (a standalone input of sequence type)."""
    zero = helper.make_node(
        "Constant", [], ["position"], value=numpy_helper.from_array(np.array(0, np.int64))
    )
    pick = helper.make_node("SequenceAt", ["sequence", "position"], ["picked"])
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="gate",
        then_branch=conv_bn_graph("then", "picked", "then_out", 5, extra_nodes=[zero, pick]),
        else_branch=identity_graph("else", "x", "else_out"),
    )
    build = helper.make_node("SequenceConstruct", ["x"], ["sequence"])
    return model_with([build, *never_true("x", "cond", "gate"), node])


def sequence_loop_model():
    """A Loop that never runs, carrying a tensor and a sequence it appends the tensor to."""
    body = loop_body("body")
    body.input.append(helper.make_tensor_sequence_value_info("history", TensorProto.FLOAT, None))
    body.node.append(helper.make_node("SequenceInsert", ["history", "v_out"], ["history_out"]))
    with_condition_output(body)
    body.output.append(helper.make_tensor_sequence_value_info("history_out", TensorProto.FLOAT, None))
    trips = [
        *never_true("x", "run", "trips"),
        helper.make_node("Cast", ["run"], ["trips"], to=TensorProto.INT64),
    ]
    start = helper.make_node("SequenceConstruct", ["x"], ["history_start"])
    node = helper.make_node(
        "Loop", ["trips", "", "x", "history_start"], ["y", "history_end"], name="repeat", body=body
    )
    return model_with([*trips, start, node])


@pytest.mark.parametrize(
    ("build", "attributes", "label"),
    [
        (sequence_branch_model, ("then_branch",), "If node gate then-branch"),
        (sequence_loop_model, ("body",), "Loop node repeat body"),
    ],
)
def test_sequences_read_or_carried_are_fed_and_compared(build, attributes, label):
    original = build()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    good = verify(original, folded.model, provider="cpu")
    bad = verify(original, corrupted(folded.model, *attributes), provider="cpu")

    assert good.passed and checks_by_label(good)[label].status == "checked"
    assert all(output.passed for output in bad.outputs)
    assert not bad.passed and not checks_by_label(bad)[label].passed


def test_a_branch_reading_an_optional_stays_uncovered_with_the_reason():
    """No standalone input is made for an optional value: ONNX Runtime refuses the branch on its own,
    and the result says so instead of claiming the branch was checked."""
    get = helper.make_node("OptionalGetElement", ["maybe"], ["picked"])
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="gate",
        then_branch=conv_bn_graph("then", "picked", "then_out", 5, extra_nodes=[get]),
        else_branch=identity_graph("else", "x", "else_out"),
    )
    original = model_with(
        [helper.make_node("Optional", ["x"], ["maybe"]), *never_true("x", "cond", "gate"), node]
    )
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1

    result = verify(original, folded.model, provider="cpu")

    assert result.passed
    check = checks_by_label(result)["If node gate then-branch"]
    assert check.status == "uncovered"
    assert check.reason.startswith("ONNX Runtime cannot run the original subgraph standalone")
    assert any(
        item.startswith("If node gate then-branch: changed by the fold, not checked locally")
        for item in result.uncovered
    )
    assert any("If node(s) gate: the condition is computed" in item for item in result.uncovered)


def test_captured_values_over_the_limit_are_skipped_with_a_note():
    original = untaken_branch_model()
    folded = fold_onnx(original).model

    result = Verifier(original, provider="cpu", local_limit_bytes=64).compare(folded)

    check = checks_by_label(result)["If node gate then-branch"]
    assert check.status == "uncovered"
    assert "limit 0.0 MiB" in check.reason and "the values it needs take" in check.reason
    assert (
        "not covered: If node gate then-branch: changed by the fold, not checked locally" in result.to_text()
    )


def test_identical_models_need_no_local_check_and_keep_the_coverage_note():
    original = untaken_branch_model()

    result = verify(original, original, provider="cpu")

    assert result.passed
    assert {check.status for check in result.local} == {"unchanged"}
    assert any("If node(s) gate: the condition is computed" in item for item in result.uncovered)


# -- generated: every place a fold can hide, every way a fold can be wrong ---------------------------
def if_in_untaken_branch_model():
    """An If whose never-taken then-branch holds another If, whose never-taken then-branch folds."""
    inner = helper.make_node(
        "If",
        ["inner_cond"],
        ["outer_then_out"],
        name="inner",
        then_branch=conv_bn_graph("then", "x", "then_out", 6),
        else_branch=identity_graph("else", "x", "else_out"),
    )
    outer_then = helper.make_graph(
        [*never_true("x", "inner_cond", "inner"), inner],
        "outer_then",
        [],
        [helper.make_tensor_value_info("outer_then_out", TensorProto.FLOAT, None)],
    )
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="gate",
        then_branch=outer_then,
        else_branch=identity_graph("outer_else", "x", "outer_else_out"),
    )
    return model_with([*never_true("x", "cond", "gate"), node])


PLACES = {
    "untaken If branch": (untaken_branch_model, ("then_branch",)),
    "Loop body that never runs": (zero_trip_loop_model, ("body",)),
    "If in a Loop body": (nested_if_in_loop_model, ("body", "then_branch")),
    "Scan body": (scan_model, ("body",)),
    "If in an untaken If branch": (if_in_untaken_branch_model, ("then_branch", "then_branch")),
}


def wrong_way(kind: str, size: float, channel: int):
    """One way to get a fold wrong: a weight scaled, a bias shifted, two output channels swapped."""

    def change(weight, bias):
        weight, bias = weight.copy(), bias.copy()
        if kind == "scale":
            weight[channel] *= 1 + size
        elif kind == "shift":
            bias[channel] += size * max(1.0, float(np.abs(bias).max()))
        else:
            other = (channel + 1) % CHANNELS
            weight[[channel, other]] = weight[[other, channel]]
            bias[[channel, other]] = bias[[other, channel]]
        return weight, bias

    return change


@settings(max_examples=15, deadline=None)
@given(
    place=st.sampled_from(sorted(PLACES)),
    kind=st.sampled_from(["none", "scale", "shift", "swap"]),
    size=st.floats(0.005, 0.05),
    sign=st.sampled_from([-1.0, 1.0]),
    channel=st.integers(0, CHANNELS - 1),
)
def test_a_fold_no_input_reaches_passes_exactly_when_it_is_right(place, kind, size, sign, channel):
    build, attributes = PLACES[place]
    original = build()
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 1
    model = (
        folded.model
        if kind == "none"
        else corrupted(folded.model, *attributes, change=wrong_way(kind, sign * size, channel))
    )

    result = verify(original, model, provider="cpu")

    assert all(output.passed for output in result.outputs)  # end to end, nothing shows either way
    assert result.passed is (kind == "none"), result.to_text()
    deepest = next(
        check
        for check in result.local
        if check.subgraph.count(">") == len(attributes) - 1 and check.status == "checked"
    )
    assert deepest.passed is (kind == "none")


def test_a_loop_started_from_constants_is_checked_with_their_values():
    """The Loop's condition and initial carried value are initializers, not computed values."""
    rng = np.random.default_rng(7)
    model = zero_trip_loop_model()
    loop = model.graph.node[-1]
    loop.input[:] = ["trips", "always", "start"]
    model.graph.initializer.extend(
        [
            tensor("always", np.array(True), np.bool_),
            tensor("start", rng.standard_normal((2, CHANNELS, 4, 4)), np.float32),
        ]
    )
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    folded = fold_onnx(model)
    assert folded.report.summary().folded == 1

    good = verify(model, folded.model, provider="cpu")
    bad = verify(model, corrupted(folded.model, "body"), provider="cpu")

    assert good.passed and checks_by_label(good)["Loop node repeat body"].status == "checked"
    assert not bad.passed and all(output.passed for output in bad.outputs)


def counted_sessions(monkeypatch) -> list[int]:
    """Patch bnfold.verify's session maker; return the list of live sessions at each creation."""
    live: list[weakref.ref] = []
    counts: list[int] = []
    real = verify_module.ort_session

    def counting(model, provider, role):
        session, used = real(model, provider, role)
        live.append(weakref.ref(session))
        counts.append(sum(reference() is not None for reference in live))
        return session, used

    monkeypatch.setattr(verify_module, "ort_session", counting)
    return counts


def test_subgraphs_the_fold_left_alone_cost_no_session(monkeypatch):
    original = untaken_branch_model()
    counts = counted_sessions(monkeypatch)

    assert verify(original, original, provider="cpu").passed
    assert counts == [1, 1]  # the original and the folded model, nothing more


def test_a_local_check_costs_one_capture_run_and_two_small_sessions_one_at_a_time(monkeypatch):
    original = untaken_branch_model()
    folded = fold_onnx(original).model
    counts = counted_sessions(monkeypatch)

    assert verify(original, folded, provider="cpu").passed
    # original, folded, the original with capture outputs, the two standalone branches
    assert counts == [1, 1, 1, 1, 1]


def test_many_checked_subgraphs_are_summed_up_in_the_text_and_listed_in_the_json():
    nodes, source = [*never_true("x", "cond", "gate")], "x"
    for index in range(12):
        output = "y" if index == 11 else f"y{index}"
        then = conv_bn_graph(f"then{index}", source, f"then{index}_out", index)
        otherwise = identity_graph(f"else{index}", source, f"else{index}_out")
        nodes.append(
            helper.make_node(
                "If", ["cond"], [output], name=f"gate{index}", then_branch=then, else_branch=otherwise
            )
        )
        source = output
    original = model_with(nodes)
    folded = fold_onnx(original)
    assert folded.report.summary().folded == 12

    result = verify(original, folded.model, provider="cpu")

    assert result.passed
    text = result.to_text()
    assert text.count("covered locally: If node") == 10
    assert "covered locally: 2 more subgraph(s), listed in the JSON result" in text
    assert "local checks: 12 subgraph(s) in" in text
    assert sum(entry["status"] == "checked" for entry in result.to_dict()["local"]) == 12
