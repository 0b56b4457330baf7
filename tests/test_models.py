"""Every reference architecture: exported with its BNs, folded, no foldable BN left, verified in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from bnfold import Outcome, Reason, fold_onnx, verify  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.registry import REFERENCE_MODELS, build  # noqa: E402


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_folds_every_bn_and_matches_torch(name, tmp_path):
    spec = REFERENCE_MODELS[name]
    module, example = build(name, seed=1)
    path = export_onnx(module, example, tmp_path / f"{name}.onnx")
    result = fold_onnx(path)
    report = result.report
    assert report.count(Outcome.FOLDED) == spec.expected_batchnorms - spec.expected_kept, report.to_text()
    assert report.count(Outcome.KEPT) == spec.expected_kept, report.to_text()
    assert [n.op_type for n in result.model.graph.node].count("BatchNormalization") == spec.expected_kept
    onnx.checker.check_model(result.model, full_check=True)

    check = verify(path, result.model, provider="cpu", input_shapes={})
    assert check.passed, check.to_text()
    # And against torch itself, on the example input.
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        torch_output = module(example).numpy()
    np.testing.assert_allclose(onnx_output, torch_output, rtol=1e-4, atol=1e-4)


def test_convnext_block_has_nothing_to_fold_and_says_why(tmp_path):
    module, example = build("convnext_downsample", seed=0)
    path = export_onnx(module, example, tmp_path / "convnext.onnx")
    report = fold_onnx(path).report
    assert report.decisions, "the LayerNorms must be reported"
    assert {d.op_type for d in report.decisions} == {"LayerNormalization"}
    assert all(
        d.outcome is Outcome.NEVER_FOLDABLE and d.reason is Reason.PER_SAMPLE_STATISTICS
        for d in report.decisions
    )


def test_preact_resnet_folds_bns_into_the_layers_after_them_and_keeps_the_pre_activation_ones(tmp_path):
    module, example = build("preact_resnet_tiny", seed=2)
    path = export_onnx(module, example, tmp_path / "preact.onnx")
    result = fold_onnx(path)
    decisions = [(d.outcome, d.rule, d.reason) for d in result.report.decisions]
    assert decisions == [
        (Outcome.KEPT, "conv-bn", Reason.PRODUCER_HAS_OTHER_CONSUMERS),  # block1.bn1: stem also feeds the Add
        (Outcome.FOLDED, "conv-bn", None),  # block1.bn2
        (Outcome.KEPT, None, Reason.NO_FOLDABLE_PRODUCER),  # block2.bn1: reads the residual Add
        (Outcome.FOLDED, "conv-bn", None),  # block2.bn2
        (Outcome.FOLDED, "bn-conv", None),  # transition BN -> 1x1 conv
        (Outcome.FOLDED, "bn-gemm", None),  # head BatchNorm1d -> Linear
    ], result.report.to_text()
    assert "between Add `/block1/Add` and Relu `/block2/relu/Relu`: no exact fold exists (Add combines" in (
        result.report.decisions[2].detail
    )

    rewritten = fold_onnx(path, rewrite_standalone=True)
    assert rewritten.report.count(Outcome.REWRITTEN) == 2
    assert "BatchNormalization" not in [n.op_type for n in rewritten.model.graph.node]
    check = verify(path, rewritten.model, provider="cpu", input_shapes={})
    assert check.passed, check.to_text()


def test_repvgg_ends_with_one_conv_per_block_and_no_batchnorm(tmp_path):
    module, example = build("repvgg_tiny", seed=3)
    path = export_onnx(module, example, tmp_path / "repvgg.onnx")
    result = fold_onnx(path)
    ops = [node.op_type for node in result.model.graph.node]
    assert ops.count("Conv") == 3 and "Add" not in ops and "BatchNormalization" not in ops, ops
    rules = [(d.node.split("/")[3], d.outcome, d.rule) for d in result.report.decisions]
    folded, merged = Outcome.FOLDED, Outcome.MERGED
    assert rules == [
        ("dense", folded, "conv-bn"),
        ("pointwise", folded, "conv-bn"),
        ("Add", merged, "branch-merge"),  # block 1 (stride 2): 3x3 + 1x1
        ("dense", folded, "conv-bn"),
        ("pointwise", folded, "conv-bn"),
        ("Add", merged, "branch-merge"),
        ("identity", folded, "branch-merge"),  # block 2: identity BN -> Dirac kernel in the merged conv
        ("Add_1", merged, "branch-merge"),
        ("dense", folded, "conv-bn"),
        ("pointwise", folded, "conv-bn"),
        ("Add", merged, "branch-merge"),
        ("identity", folded, "branch-merge"),  # block 3: grouped, identity on the in-group channel
        ("Add_1", merged, "branch-merge"),
    ], result.report.to_text()
    check = verify(path, result.model, provider="cpu", input_shapes={})
    assert check.passed, check.to_text()


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_levit_linear_bn_over_flattened_tokens_folds_through_the_flatten(tmp_path, dynamic_batch):
    module, example = build("levit_tiny", seed=4)
    path = export_onnx(module, example, tmp_path / "levit.onnx", dynamic_batch=dynamic_batch)
    result = fold_onnx(path)
    decisions = [(d.node, d.rule, d.into) for d in result.report.decisions]
    assert decisions == [
        ("/stem/stem.1/BatchNormalization", "conv-bn", "/stem/stem.0/Conv"),
        ("/stem/stem.4/BatchNormalization", "conv-bn", "/stem/stem.3/Conv"),
        # MatMul -> Flatten -> BN -> Reshape(Shape(MatMul)): the BN goes, the Flatten stays, and the
        # bias-free Linear gets the BN's shift as an Add.
        ("/mlp/mlp.0/bn/BatchNormalization", "matmul-reshape-bn", "/mlp/mlp.0/linear/MatMul"),
        ("/mlp/mlp.2/bn/BatchNormalization", "matmul-reshape-bn", "/mlp/mlp.2/linear/MatMul"),
        ("/head_bn/BatchNormalization", "bn-gemm", "/head/Gemm"),
    ], result.report.to_text()
    ops = [node.op_type for node in result.model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Flatten") == 2
    shapes = {"input": [3, 3, 16, 16]} if dynamic_batch else {}
    check = verify(path, result.model, provider="cpu", input_shapes=shapes)
    assert check.passed, check.to_text()
