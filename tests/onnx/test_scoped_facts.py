"""Shape facts are facts of a tensor in its scope, never of a same-named tensor elsewhere, and never
from declarations ONNX Runtime does not enforce (issue 12, items 1 and 2).

Property tests build the graphs that broke this: ``If`` branches that reuse names for tensors of
different ranks, ``Loop`` and ``Scan`` bodies whose declared input shapes differ from what runs. Every
fold is checked numerically in ONNX Runtime at several input sizes and for both branches.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import bn_node, bn_params, make_model, run, tensor


def _close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for candidate, reference in zip(actual, expected, strict=True):
        assert candidate.shape == reference.shape
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(candidate, reference, rtol=2e-5 * scale, atol=2e-5 * scale)


def _branch(name: str, source: str, channels: int, seed: int) -> onnx.GraphProto:
    """``a = Identity(source); h = MatMul(a, W); out = BN(h)`` with names every branch reuses."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Identity", [source], ["a"], name="identity"),
        helper.make_node("MatMul", ["a", "W"], ["h"], name="matmul"),
        bn_node("h", "out", prefix="bn"),
    ]
    initializers = [tensor("W", rng.standard_normal((channels, channels)), np.float32)]
    initializers += bn_params(rng, channels, prefix="bn")
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers
    )


@given(
    then_rank=st.sampled_from([2, 3]),
    else_rank=st.sampled_from([2, 3]),
    channels=st.integers(2, 4),
    rewrite=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sibling_if_branches_reusing_names_never_answer_for_each_other(
    then_rank, else_rank, channels, rewrite, seed
):
    """A matmul-bn folds only in a branch where its own ``a`` is 2-D; a 3-D ``a`` of the same name in
    the sibling branch (BN axis 1 is then not the MatMul's column axis) is never folded as 2-D."""
    sources = {2: "x2", 3: "x3"}
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="if",
        then_branch=_branch("then", sources[then_rank], channels, seed),
        else_branch=_branch("else", sources[else_rank], channels, seed + 1),
    )
    inputs = [
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", channels]),
        helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["N", channels, channels]),
    ]
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    result = fold_onnx(model, rewrite_standalone=rewrite)
    for decision in result.report.decisions:
        rank = then_rank if decision.graph.endswith("then_branch") else else_rank
        expected = Outcome.FOLDED if rank == 2 else (Outcome.REWRITTEN if rewrite else Outcome.KEPT)
        assert decision.outcome is expected, result.report.to_text()
    rng = np.random.default_rng(seed)
    for rows in (1, 3):
        for cond in (True, False):
            feeds = {
                "cond": np.array(cond),
                "x2": rng.standard_normal((rows, channels)).astype(np.float32),
                "x3": rng.standard_normal((rows, channels, channels)).astype(np.float32),
            }
            _close(run(result.model, feeds), run(model, feeds))


def _body_nodes(source: str, target: list[int], channels: int) -> tuple[list[onnx.NodeProto], list]:
    """``MatMul(source, W) -> Reshape(target) -> BN -> out`` and its constants."""
    rng = np.random.default_rng(channels)
    nodes = [
        helper.make_node("MatMul", [source, "W"], ["m"], name="matmul"),
        helper.make_node("Reshape", ["m", "target"], ["r"], name="reshape"),
        bn_node("r", "out", prefix="bn"),
    ]
    initializers = [
        tensor("W", rng.standard_normal((channels, channels)), np.float32),
        tensor("target", np.array(target), np.int64),
        *bn_params(rng, channels, prefix="bn"),
    ]
    return nodes, initializers


TARGETS = {"rows-of-channels": lambda c: [-1, c], "channels-then-rest": lambda c: [0, c, -1]}


@given(
    source=st.sampled_from(["carried", "outer"]),
    target=st.sampled_from(sorted(TARGETS)),
    declared_tokens=st.sampled_from([1, 2, 3]),
    channels=st.integers(2, 4),
)
def test_loop_bodies_never_trust_declared_input_shapes(source, target, declared_tokens, channels):
    """``MatMul -> Reshape -> BN`` in a Loop body: over a carried value declared ``[2, T, C]`` (ONNX
    Runtime does not check the declaration), or over the outer input itself. ``[0, C, -1]`` maps the
    BN's channels onto the MatMul's only when ``T == 1``: folding on the declaration is wrong when 3
    tokens run."""
    body_source = "v" if source == "carried" else "x"
    nodes, initializers = _body_nodes(body_source, TARGETS[target](channels), channels)
    nodes += [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Identity", ["v"], ["v_next"]),
    ]
    body = helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, declared_tokens, channels]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_next", TensorProto.FLOAT, [2, declared_tokens, channels]),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        ],
        initializers,
    )
    loop = helper.make_node("Loop", ["trips", "", "x"], ["v_final", "ys"], name="loop", body=body)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "T", channels])]
    outputs = [
        helper.make_tensor_value_info("v_final", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("ys", TensorProto.FLOAT, None),
    ]
    model = make_model([loop], inputs, outputs, [tensor("trips", np.array(2), np.int64)])
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    always_preserving = source == "outer" and target == "rows-of-channels"
    assert decision.outcome is (Outcome.FOLDED if always_preserving else Outcome.KEPT), (
        result.report.to_text()
    )
    if decision.outcome is Outcome.KEPT:
        assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING, decision.detail
    for tokens in (1, 3):
        feeds = {"x": np.random.default_rng(tokens).standard_normal((2, tokens, channels)).astype(np.float32)}
        _close(run(result.model, feeds), run(model, feeds))


@given(declared_tokens=st.sampled_from([1, 2, 3]), channels=st.integers(2, 4), over_state=st.booleans())
def test_scan_bodies_never_trust_declared_input_shapes(declared_tokens, channels, over_state):
    """The same through a Scan: over its state (declared ``[2, T, C]``, initialised from the outer
    input) or over the scanned slice (declared likewise); ``[0, C, -1]`` preserves channels only for
    one token, which the declaration claims and the run does not hold."""
    nodes, initializers = _body_nodes("s" if over_state else "e", [0, channels, -1], channels)
    nodes.append(helper.make_node("Identity", ["s"], ["s_next"]))
    declared = [2, declared_tokens, channels]
    body = helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, declared),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, declared),
        ],
        [
            helper.make_tensor_value_info("s_next", TensorProto.FLOAT, declared),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        ],
        initializers,
    )
    scan = helper.make_node(
        "Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1
    )
    inputs = [
        helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2, "T", channels]),
        helper.make_tensor_value_info("xs", TensorProto.FLOAT, [3, 2, "T", channels]),
    ]
    outputs = [
        helper.make_tensor_value_info("s_final", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("ys", TensorProto.FLOAT, None),
    ]
    model = make_model([scan], inputs, outputs, [])
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING
    compared = 0
    for tokens in (1, 2, 3):
        rng = np.random.default_rng(tokens)
        feeds = {
            "s0": rng.standard_normal((2, tokens, channels)).astype(np.float32),
            "xs": rng.standard_normal((3, 2, tokens, channels)).astype(np.float32),
        }
        try:
            expected = run(model, feeds)
        except Exception:  # ONNX Runtime sizes a Scan's outputs from the body's declarations
            continue
        _close(run(result.model, feeds), expected)
        compared += 1
    assert compared  # at least the declared size runs


def test_a_scan_over_a_fixed_outer_shape_still_folds_what_holds_for_every_size():
    """Not vacuous: a Scan slice of ``[K, N, T, C]`` reshaped to ``[-1, C]`` maps channels one-to-one
    whatever N and T are, and the BN folds."""
    channels = 3
    nodes, initializers = _body_nodes("e", [-1, channels], channels)
    nodes.append(helper.make_node("Identity", ["s"], ["s_next"]))
    body = helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("s_next", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        ],
        initializers,
    )
    scan = helper.make_node(
        "Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1
    )
    inputs = [
        helper.make_tensor_value_info("s0", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("xs", TensorProto.FLOAT, [2, "N", "T", channels]),
    ]
    outputs = [
        helper.make_tensor_value_info("s_final", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("ys", TensorProto.FLOAT, None),
    ]
    model = make_model([scan], inputs, outputs, [])
    result = fold_onnx(model)
    assert [d.outcome for d in result.report.decisions] == [Outcome.FOLDED], result.report.to_text()
    for rows, tokens in ((1, 1), (2, 3)):
        feeds = {
            "s0": np.ones(1, np.float32),
            "xs": np.random.default_rng(rows).standard_normal((2, rows, tokens, channels)).astype(np.float32),
        }
        _close(run(result.model, feeds), run(model, feeds))


@given(channels=st.integers(2, 4), trips=st.integers(1, 3), target=st.sampled_from(sorted(TARGETS)))
def test_loop_carried_values_that_grow_between_iterations(channels, trips, target):
    """The carried value starts as the outer input, declared and run ``[2, 1, C]`` (ONNX Runtime checks
    a graph input), and the body declares it so too, but each iteration doubles its tokens
    (``Concat(BN output, v)``): from the second iteration T = 2, 4, ... A fold that takes the body
    input's shape from its declaration or its initial value is wrong there. (``[-1, C]`` holds for
    every T, but the body input's rank is not trusted either: it may be kept.)"""
    nodes, initializers = _body_nodes("v", TARGETS[target](channels), channels)
    nodes += [  # the BN's output, back in v's shape, then v: twice the tokens for the next iteration
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Shape", ["v"], ["v_shape"]),
        helper.make_node("Reshape", ["out", "v_shape"], ["back"]),
        helper.make_node("Concat", ["back", "v"], ["v_next"], axis=1),
    ]
    body = helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 1, channels]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_next", TensorProto.FLOAT, None),
        ],
        initializers,
    )
    loop = helper.make_node("Loop", ["trips", "", "x"], ["v_final"], name="loop", body=body)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, channels])]
    outputs = [helper.make_tensor_value_info("v_final", TensorProto.FLOAT, None)]
    model = make_model([loop], inputs, outputs, [tensor("trips", np.array(trips), np.int64)])
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    if target == "channels-then-rest" and trips > 1:  # the second iteration runs T = 2
        assert decision.outcome is Outcome.KEPT, result.report.to_text()
        assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING, decision.detail
    feeds = {"x": np.random.default_rng(trips).standard_normal((2, 1, channels)).astype(np.float32)}
    _close(run(result.model, feeds), run(model, feeds))
