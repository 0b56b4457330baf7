"""Add of parallel branches of one input merged into one Conv (RepVGG, ACNet, MobileOne), checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import DTYPES, bn_node, bn_params, make_model, op_types, run, tensor
from tests.onnx.helpers import fold_and_compare


def branch(kernel=(3, 3), pads=None, **options) -> dict:
    """One Conv branch: ``pads`` default to centred (``k // 2`` at both ends), ``bn`` after it by default."""
    pads = list(pads) if pads is not None else [k // 2 for k in kernel] * 2
    return {"kernel": tuple(kernel), "pads": pads, **options}


def branches_model(
    convs: list[dict],
    *,
    identity: str | None = None,
    channels: int = 4,
    out_channels: int | None = None,
    dtype: str = "float32",
    bn_dtype: str | None = None,
    opset: int = 17,
    seed: int = 0,
    spatial: int = 7,
    chain: str = "left",
) -> onnx.ModelProto:
    """x -> parallel Conv[-> BN] branches (and an identity branch: "bn" = BN(x), "plain" = x) -> Adds -> y.

    ``chain="left"`` sums as ``Add(Add(b0, b1), b2)``, ``"right"`` as ``Add(b0, Add(b1, b2))``.
    Branch options: ``group``, ``strides``, ``dilations``, ``auto_pad``, ``bias``, ``bn`` (default True).
    """
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    bn_numpy_dtype = DTYPES[bn_dtype or dtype][0]
    out_channels = out_channels or channels
    rank = len(convs[0]["kernel"])
    nodes, initializers, outputs = [], [], []
    for index, spec in enumerate(convs):
        group = spec.get("group", 1)
        weight = rng.standard_normal((out_channels, channels // group, *spec["kernel"])) * 0.5
        initializers.append(tensor(f"W{index}", weight, numpy_dtype))
        inputs = ["x", f"W{index}"]
        if spec.get("bias", True):
            initializers.append(tensor(f"B{index}", rng.standard_normal(out_channels), numpy_dtype))
            inputs.append(f"B{index}")
        attributes = {"group": group, "kernel_shape": list(spec["kernel"])}
        for name in ("strides", "dilations"):
            if name in spec:
                attributes[name] = [spec[name]] * rank
        if "auto_pad" in spec:
            attributes["auto_pad"] = spec["auto_pad"]
        else:
            attributes["pads"] = spec["pads"]
        nodes.append(helper.make_node("Conv", inputs, [f"conv{index}"], name=f"conv{index}", **attributes))
        outputs.append(f"conv{index}")
        if spec.get("bn", True):
            initializers += bn_params(rng, out_channels, bn_numpy_dtype, prefix=f"bn{index}")
            nodes.append(bn_node(f"conv{index}", f"branch{index}", prefix=f"bn{index}"))
            outputs[-1] = f"branch{index}"
    if identity == "bn":
        initializers += bn_params(rng, channels, bn_numpy_dtype, prefix="bn_identity")
        nodes.append(bn_node("x", "identity", prefix="bn_identity"))
        outputs.append("identity")
    elif identity == "plain":
        outputs.append("x")
    if chain == "right":
        outputs.reverse()
    total = outputs[0]
    for index, name in enumerate(outputs[1:]):
        inputs = [total, name] if chain == "left" else [name, total]
        total = "y" if index == len(outputs) - 2 else f"sum{index}"
        nodes.append(helper.make_node("Add", inputs, [total], name=f"add{index}"))
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, ["N", channels, *[spatial] * rank])]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    info = model.graph.input[0].type.tensor_type
    shape = [2 if dim.dim_param else dim.dim_value for dim in info.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def merged(model: onnx.ModelProto, folded: int) -> onnx.ModelProto:
    """Fold, compare in ORT, and check that one Conv and no Add is left."""
    result = fold_and_compare(model, feeds(model), folded=folded)
    assert op_types(result.model) == ["Conv"], result.report.to_text()
    return result


def unchanged(model: onnx.ModelProto):
    """A refused merge leaves the model byte for byte as it was (branches here have no BN to fold)."""
    result = fold_onnx(model)
    assert result.model.SerializeToString() == model.SerializeToString()
    return result


def identity_decision(result):
    (decision,) = [d for d in result.report.decisions if d.node == "bn_identity"]
    return decision


# -- merges ----------------------------------------------------------------------------------------


def test_repvgg_3x3_plus_1x1_merges_after_both_folds():
    model = branches_model([branch((3, 3)), branch((1, 1))])
    result = merged(model, folded=2)
    assert [(d.op_type, d.outcome, d.rule) for d in result.report.decisions] == [
        ("BatchNormalization", Outcome.FOLDED, "conv-bn"),
        ("BatchNormalization", Outcome.FOLDED, "conv-bn"),
        ("Add", Outcome.MERGED, "branch-merge"),  # the graph changed: the report says where
    ]
    assert result.changed
    conv = result.model.graph.node[0]
    assert conv.output[0] == "y" and conv.name == "conv0"
    assert conv.attribute == model.graph.node[0].attribute, "the 3x3 window holds the 1x1: nothing to rewrite"


def test_repvgg_identity_bn_is_reported_folded_into_the_merged_conv():
    result = merged(branches_model([branch((3, 3)), branch((1, 1))], identity="bn"), folded=3)
    decision = identity_decision(result)
    assert (decision.outcome, decision.rule, decision.into) == (Outcome.FOLDED, "branch-merge", "conv0")
    summary = "3 BatchNormalization: 3 folded, 0 kept; 2 Add of parallel branches merged"
    assert result.report.summary() == summary


@pytest.mark.parametrize("chain", ["left", "right"])
def test_acnet_3x3_1x3_3x1_with_identity_merges_in_either_chain_order(chain):
    convs = [branch((3, 3)), branch((1, 3)), branch((3, 1))]
    merged(branches_model(convs, identity="bn", chain=chain), folded=4)


def test_mobileone_several_kxk_branches_1x1_and_identity_merge_into_one_conv():
    convs = [branch((3, 3)), branch((3, 3)), branch((3, 3)), branch((1, 1))]
    merged(branches_model(convs, identity="bn", seed=3), folded=5)


@pytest.mark.parametrize("groups", [2, 4])  # 4 = depthwise
def test_grouped_and_depthwise_branches_put_the_identity_on_the_in_group_channel(groups):
    convs = [branch((3, 3), group=groups), branch((1, 1), group=groups)]
    merged(branches_model(convs, identity="bn", seed=groups), folded=3)


def test_dilated_branches_merge_when_taps_line_up():
    convs = [branch((3, 3), pads=[2, 2, 2, 2], dilations=2), branch((1, 1), dilations=2)]
    merged(branches_model(convs, identity="bn"), folded=3)


def test_stride_2_branches_merge_without_identity():
    convs = [branch((3, 3), strides=2), branch((1, 1), strides=2)]
    merged(branches_model(convs, out_channels=6), folded=2)


def test_asymmetric_pads_merge_into_a_larger_window():
    # Both give 7 outputs; first taps 1 apart: the sum is a 4x4 kernel with pads (1, 2).
    convs = [branch((3, 3), pads=[0, 0, 2, 2], bn=False), branch((3, 3), pads=[1, 1, 1, 1], bn=False)]
    result = merged(branches_model(convs), folded=0)
    weight = {t.name: t for t in result.model.graph.initializer}[result.model.graph.node[0].input[1]]
    assert list(weight.dims) == [4, 4, 4, 4]


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_with_stride_1_becomes_explicit_pads(auto_pad):
    convs = [branch((2, 2), auto_pad=auto_pad), branch((3, 3), auto_pad=auto_pad), branch((1, 1))]
    result = merged(branches_model(convs, identity="plain"), folded=3)
    assert "auto_pad" not in [a.name for a in result.model.graph.node[0].attribute]


def test_auto_pad_valid_merges():
    convs = [branch((3, 3), auto_pad="VALID"), branch((3, 3), pads=[0, 0, 0, 0])]
    merged(branches_model(convs), folded=2)


def test_plain_identity_x_plus_conv_x_merges_as_a_dirac_kernel():
    result = merged(branches_model([branch((3, 3), bn=False, bias=False)], identity="plain"), folded=0)
    assert len(result.model.graph.node[0].input) == 2, "no bias is added for a plain identity"


@pytest.mark.parametrize("rank", [1, 3])
def test_1d_and_3d_branches(rank):
    convs = [branch((3,) * rank), branch((1,) * rank)]
    merged(branches_model(convs, identity="bn", spatial=5), folded=3)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 15, 17, 21])
def test_across_opsets(opset):
    merged(branches_model([branch((3, 3)), branch((1, 1))], identity="bn", opset=opset), folded=3)


@pytest.mark.parametrize(("dtype", "bn_dtype", "opset"), [("float16", None, 17), ("float16", "float32", 15)])
def test_float16_merges_in_float64_and_rounds_once(dtype, bn_dtype, opset):
    model = branches_model(
        [branch((3, 3)), branch((1, 1))], identity="bn", dtype=dtype, bn_dtype=bn_dtype, opset=opset
    )
    result = merged(model, folded=3)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}


def test_a_merge_enables_a_fold_after_it():
    model = branches_model([branch((3, 3), bn=False), branch((1, 1), bn=False)])
    rng = np.random.default_rng(5)
    model.graph.initializer.extend(bn_params(rng, 4, prefix="bn_after"))
    model.graph.node[-1].output[0] = "sum"
    model.graph.node.append(bn_node("sum", "y", prefix="bn_after"))
    result = merged(model, folded=1)
    (batchnorm,) = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert batchnorm.rule == "conv-bn"


def test_shared_weight_is_copied_not_edited():
    model = branches_model([branch((3, 3), bn=False), branch((1, 1), bn=False)])
    model.graph.node.append(helper.make_node("Conv", ["x", "W0"], ["other"], name="other", pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 4, 7, 7]))
    result = fold_and_compare(model, feeds(model), folded=0)
    assert op_types(result.model) == ["Conv", "Conv"]


def test_branches_inside_an_if_branch_merge_reading_the_outer_scope_input():
    body = branches_model(plain(branch((3, 3)), branch((1, 1))), identity="bn").graph
    then_branch = helper.make_graph(
        list(body.node),
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(body.initializer),
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"])],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)],
    )
    node = helper.make_node(
        "If", ["cond"], ["out"], name="if", then_branch=then_branch, else_branch=else_branch
    )
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 7]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    model = make_model([node], inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [])
    result = fold_onnx(model)
    assert identity_decision(result).outcome is Outcome.FOLDED
    assert identity_decision(result).graph == "main/if.then_branch"
    (then_graph,) = [a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch"]
    assert [n.op_type for n in then_graph.node] == ["Conv"]
    onnx.checker.check_model(result.model, full_check=True)
    inputs = {**feeds(model), "cond": np.array(True)}
    np.testing.assert_allclose(run(result.model, inputs)[0], run(model, inputs)[0], rtol=2e-5, atol=2e-5)


@st.composite
def branch_cases(draw):
    rank = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    slack = [draw(st.integers(0, 1)) for _ in range(rank)]
    convs = []
    for _ in range(draw(st.integers(1, 3))):
        kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
        begin = [draw(st.integers(0, dilation * (k - 1) + s)) for k, s in zip(kernel, slack, strict=True)]
        end = [s + dilation * (k - 1) - b for k, s, b in zip(kernel, slack, begin, strict=True)]
        convs.append(
            branch(
                kernel,
                pads=begin + end,
                group=groups,
                strides=stride,
                dilations=dilation,
                bn=draw(st.booleans()),
                bias=draw(st.booleans()),
            )
        )
    identity_fits = stride == 1 and not any(slack)
    identity = draw(st.sampled_from([None, "bn", "plain"] if identity_fits else [None]))
    if len(convs) == 1 and identity is None:
        convs.append(convs[0])  # an Add needs two branches; the weights are drawn anew
    return convs, identity, draw(st.integers(0, 1000))


@given(branch_cases())
def test_any_branches_fold_to_the_same_function_and_merge_when_taps_line_up(case):
    convs, identity, seed = case
    model = branches_model(convs, identity=identity, seed=seed, spatial=6)
    dilation = convs[0]["dilations"]
    rank = len(convs[0]["kernel"])
    starts = [[c["pads"][axis] for c in convs] + ([0] if identity else []) for axis in range(rank)]
    aligned = all(len({start % dilation for start in axis_starts}) == 1 for axis_starts in starts)
    event("merged" if aligned else "taps misaligned")
    # Every conv branch's BN folds; the identity BN (summed last) only by a merge.
    batchnorms = op_types(model).count("BatchNormalization")
    kept = int(identity == "bn" and not aligned)
    result = fold_and_compare(model, feeds(model), folded=batchnorms - kept)
    assert (op_types(result.model) == ["Conv"]) == aligned, result.report.to_text()


# -- refusals --------------------------------------------------------------------------------------


def plain(*convs: dict) -> list[dict]:
    return [{**spec, "bn": False} for spec in convs]


@pytest.mark.parametrize(
    "convs",
    [
        plain(branch((3, 3), strides=2), branch((1, 1))),  # strides differ
        plain(branch((3, 3)), branch((3, 3), pads=[2, 2, 2, 2], dilations=2)),  # dilations differ
        plain(branch((3, 3), group=2), branch((3, 3))),  # groups differ
        plain(branch((3, 3)), branch((1, 1), pads=[1, 1, 1, 1])),  # output sizes differ
        plain(branch((3, 3), pads=[1, 1, 3, 3], dilations=2), branch((1, 1), dilations=2)),  # taps misaligned
        plain(
            branch((3, 3), auto_pad="SAME_UPPER", strides=2), branch((3, 3), auto_pad="SAME_UPPER", strides=2)
        ),
    ],
    ids=["strides", "dilations", "groups", "output-size", "misaligned", "same-strided"],
)
def test_incompatible_conv_branches_are_left_alone(convs):
    assert unchanged(branches_model(convs)).report.decisions == []


def test_different_output_channels_are_left_alone():
    model = branches_model(plain(branch((3, 3)), branch((1, 1))))
    model.graph.initializer[2].CopyFrom(tensor("W1", np.ones((1, 4, 1, 1)), np.float32))  # broadcasts
    model.graph.initializer[3].CopyFrom(tensor("B1", np.ones(1), np.float32))
    unchanged(model)


def test_branch_output_read_elsewhere_is_left_alone():
    model = branches_model(plain(branch((3, 3)), branch((1, 1))))
    model.graph.node.append(helper.make_node("Relu", ["conv1"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    unchanged(model)


def test_branch_output_that_is_a_graph_output_is_left_alone():
    model = branches_model(plain(branch((3, 3)), branch((1, 1))))
    model.graph.output.append(helper.make_tensor_value_info("conv0", TensorProto.FLOAT, None))
    unchanged(model)


def test_branches_of_different_inputs_are_left_alone():
    model = branches_model(plain(branch((3, 3)), branch((1, 1))))
    model.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 7, 7]))
    model.graph.node[1].input[0] = "z"
    unchanged(model)


def test_malformed_dilations_are_refused_not_crashed_on():
    model = branches_model(plain(branch((3, 3), dilations=1), branch((3, 3), dilations=1)))
    for conv in model.graph.node[:2]:
        (dilations,) = [a for a in conv.attribute if a.name == "dilations"]
        dilations.ints[:] = [0, 0]  # invalid, but the checker lets it through
    unchanged(model)


def test_weight_computed_at_run_time_is_left_alone():
    # W1 + a graph input: the weight is only known at run time. (An Identity of an initializer is a
    # constant sub-expression, which folds: test_a_weight_behind_an_identity_of_an_initializer_merges.)
    model = branches_model(plain(branch((3, 3)), branch((1, 1))))
    model.graph.input.append(helper.make_tensor_value_info("W1_delta", TensorProto.FLOAT, []))
    model.graph.node.insert(0, helper.make_node("Add", ["W1", "W1_delta"], ["W1_copy"], name="copy"))
    model.graph.node[2].input[1] = "W1_copy"
    unchanged(model)


def identity_beside_misaligned_dilated_conv() -> onnx.ModelProto:
    """Dilation 2 with pads (1, 3): same output size as the input, but the identity falls between taps."""
    return branches_model(plain(branch((3, 3), pads=[1, 1, 3, 3], dilations=2)), identity="bn")


@pytest.mark.parametrize(
    ("build", "reason", "words"),
    [
        (identity_beside_misaligned_dilated_conv, Reason.BRANCHES_INCOMPATIBLE, "dilation steps"),
        (
            lambda: branches_model(plain(branch((3, 3), strides=2)), identity="bn"),
            Reason.BRANCHES_INCOMPATIBLE,
            "strides differ",
        ),
        (
            lambda: branches_model(plain(branch((1, 1))), identity="bn", channels=4, out_channels=1),
            Reason.BRANCHES_INCOMPATIBLE,
            "maps 4 channels to 1",
        ),
    ],
    ids=["misaligned", "strided", "channels"],
)
def test_identity_bn_that_cannot_merge_is_kept_with_the_reason(build, reason, words):
    model = build()
    result = unchanged(model)
    decision = identity_decision(result)
    assert (decision.outcome, decision.rule, decision.reason) == (Outcome.KEPT, "branch-merge", reason)
    assert decision.detail.startswith("identity branch of Add add0: ") and words in decision.detail


def test_identity_bn_output_read_elsewhere_is_kept():
    model = branches_model(plain(branch((3, 3))), identity="bn")
    model.graph.output.append(helper.make_tensor_value_info("identity", TensorProto.FLOAT, None))
    decision = identity_decision(unchanged(model))
    assert decision.reason is Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS and decision.rule == "branch-merge"


def test_identity_bn_in_training_mode_is_kept():
    model = branches_model(plain(branch((3, 3))), identity="bn")
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    assert identity_decision(unchanged(model)).reason is Reason.TRAINING_MODE


def test_skipping_branch_merge_keeps_the_identity_bn_as_rule_disabled():
    model = branches_model([branch((3, 3))], identity="bn")
    result = fold_onnx(model, skip_rules=["branch-merge"])
    assert op_types(result.model) == ["Conv", "BatchNormalization", "Add"]
    decision = identity_decision(result)
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.RULE_DISABLED)


def test_identity_bn_that_cannot_merge_is_rewritten_on_request():
    model = identity_beside_misaligned_dilated_conv()
    result = fold_onnx(model, rewrite_standalone=True)
    assert identity_decision(result).outcome is Outcome.REWRITTEN
    assert "BatchNormalization" not in op_types(result.model)
