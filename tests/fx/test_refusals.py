"""Every refusal on the PyTorch path: the BN is kept, the module still computes the original function,
and the report gives the exact reason code. One case (at least) per code the PyTorch path can give."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import BnfoldError, Outcome, Reason  # noqa: E402
from bnfold.fx.rules import TORCH_REASONS  # noqa: E402
from tests.fx import nets  # noqa: E402


def conv_bn(**options):
    return nets.randomized(nets.ConvBN(**options)), torch.randn(2, 4, 5, 5)


def bn_after_relu():
    return nets.randomized(nets.BNAfterReLU()), torch.randn(2, 3, 5, 5)


def conv_output_reused():
    return nets.randomized(nets.ConvOutputReused()), torch.randn(2, 3, 5, 5)


def conv_output_returned():
    return nets.randomized(nets.ConvOutputReturned()), torch.randn(2, 3, 5, 5)


def negative_scale_after_max_pool():
    conv_pool_bn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(4)
    )
    model = nets.randomized(conv_pool_bn)
    with torch.no_grad():
        model[2].weight[0] = -abs(model[2].weight[0]) - 0.5
    return model, torch.randn(2, 3, 6, 6)


def computed_statistics():
    return nets.randomized(nets.ComputedStatistics()), torch.randn(2, 3, 5, 5)


def bn_in_training_mode():
    model, example = conv_bn()
    model.bn.train()
    return model, example


def saved_statistics_read():
    return nets.randomized(nets.SavedStatisticsRead()), torch.randn(2, 3, 5, 5)


def negative_variance():
    model, example = conv_bn()
    with torch.no_grad():
        model.bn.running_var[2] = -1.0
    return model, example


def nan_mean():
    model, example = conv_bn()
    with torch.no_grad():
        model.bn.running_mean[1] = float("nan")
    return model, example


def computed_weight():
    return nets.randomized(nets.StandardizedConvBN()), torch.randn(2, 3, 5, 5)


def complex_weight():
    model, _ = conv_bn()
    model.conv.to(torch.complex64)
    return model, None  # cannot run: checked by tracing alone


def linear_on_3d_input():
    return nets.randomized(nets.Linear3D()), torch.randn(2, 5, 6)


def float16_overflow():
    model, example = conv_bn()
    model.half()
    with torch.no_grad():
        model.bn.weight.fill_(6e4)
        model.bn.running_var.fill_(1e-7)
    model.bn.eps = 1e-9
    return model, None  # half conv may not run on CPU; the refusal needs no run


def rule_disabled():
    return conv_bn()


def shared_bn():
    return nets.randomized(nets.BNCalledTwice()), torch.randn(2, 3, 5, 5)


def no_running_statistics():
    return conv_bn(track_running_stats=False)


def linear_without_example_inputs():
    return nets.randomized(nets.LinearBN()), None


def hook_on_conv():
    model, example = conv_bn()
    model.conv.register_forward_hook(lambda module, inputs, output: output * 2)
    return model, example


def hook_on_bn():
    model, example = conv_bn()
    model.bn.register_forward_pre_hook(lambda module, inputs: None)
    return model, example


def wrong_channel_count():
    model = nets.randomized(nets.ConvBN(out_channels=6))
    model.bn = nets.randomized(torch.nn.BatchNorm2d(5))
    return model, None  # would fail at run time; the refusal needs no run


def bn_before_padded_conv():
    model = nets.bn_before(torch.nn.Conv2d(4, 6, 3, padding=1), 4)
    return model, torch.randn(2, 4, 5, 5)


def bn_before_strided_conv_transpose():
    model = nets.bn_before(torch.nn.ConvTranspose2d(4, 6, 2, stride=2), 4)
    return model, torch.randn(2, 4, 5, 5)


def bn_output_also_returned():
    model = nets.bn_before(torch.nn.Conv2d(4, 6, 1), 4, also_return_bn=True)
    return model, torch.randn(2, 4, 5, 5)


def identity_branch_changes_channels():
    # conv 1 -> 4 channels plus bn(x) of 1 channel: broadcasts, but no identity kernel maps 1 to 4.
    model = nets.Branches(1, [dict(kernel_size=3, padding=1)], out_channels=4, with_bn=False)
    return nets.randomized(model), torch.randn(2, 1, 5, 5)


def reshape_moves_the_features():
    # [2, 6, 3] -> [2, 3, 6]: the BN's axis 1 has 3 channels, but not the Linear's 3 features.
    model = nets.LeViTLinearBN(4, 3, lambda features: features.reshape(features.shape[0], 3, -1))
    return nets.randomized(model), torch.randn(2, 6, 4)


def view_keeps_features_only_for_one_token():
    # [2, 1, 4] -> view(B, 4, T): the features land on axis 1 for T = 1 only (T = 3 interleaves them).
    return nets.randomized(nets.LinearViewBN(4)), torch.randn(2, 1, 4)


def conv1d_without_example_inputs():
    # Unbatched input [C, L] would put L on the BatchNorm1d's axis 1: without an example nothing says
    # the conv output is batched.
    return nets.randomized(nets.ConvBN(dims=1)), None


def written_between_bn_and_conv():
    return nets.randomized(nets.MutatedBetweenBNAndConv()), torch.randn(2, 4, 5, 5)


CASES = {
    Reason.NO_FOLDABLE_PRODUCER: [bn_after_relu],
    Reason.PRODUCER_HAS_OTHER_CONSUMERS: [conv_output_reused],
    Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT: [conv_output_returned],
    Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS: [bn_output_also_returned],
    Reason.PADDING_AFTER_BN: [bn_before_padded_conv],
    Reason.UNEVEN_TAPS_AFTER_BN: [bn_before_strided_conv_transpose],
    Reason.PARAM_NOT_CONSTANT: [computed_statistics],
    Reason.PARAM_SHAPE_MISMATCH: [wrong_channel_count],
    Reason.TRAINING_MODE: [bn_in_training_mode],
    Reason.EXTRA_OUTPUTS_USED: [saved_statistics_read],
    Reason.NONPOSITIVE_VARIANCE: [negative_variance],
    Reason.NONFINITE_STATISTICS: [nan_mean],
    Reason.WEIGHT_NOT_CONSTANT: [computed_weight],
    Reason.UNSUPPORTED_DTYPE: [complex_weight],
    Reason.CHANNEL_AXIS_MISMATCH: [linear_on_3d_input],
    Reason.FOLD_OVERFLOWS_DTYPE: [float16_overflow],
    Reason.RULE_DISABLED: [rule_disabled],
    Reason.SHARED_MODULE: [shared_bn],  # a shared layer gets a copy: tests/fx/test_shared_layers_fx.py
    Reason.NO_RUNNING_STATISTICS: [no_running_statistics],
    Reason.UNKNOWN_SHAPE: [linear_without_example_inputs, conv1d_without_example_inputs],
    Reason.HOOKS_REGISTERED: [hook_on_conv, hook_on_bn],
    Reason.CUSTOM_FORWARD: [],  # a GraphModule input: see test_leaf_bn_with_custom_forward_is_kept
    Reason.BRANCHES_INCOMPATIBLE: [identity_branch_changes_channels],
    Reason.RESHAPE_NOT_CHANNEL_PRESERVING: [reshape_moves_the_features],
    Reason.SHAPE_DEPENDENT: [view_keeps_features_only_for_one_token],
    Reason.MUTATED_IN_PLACE: [written_between_bn_and_conv],
    Reason.POOL_DOES_NOT_COMMUTE: [negative_scale_after_max_pool],
}


def test_every_reason_code_the_torch_path_can_give_has_a_negative_test() -> None:
    covered = set(CASES) | {Reason.PER_SAMPLE_STATISTICS}
    assert covered == TORCH_REASONS


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize(
    ("reason", "build"),
    [(reason, build) for reason, builds in CASES.items() for build in builds],
    ids=lambda value: value if isinstance(value, str) else getattr(value, "__name__", ""),
)
def test_refusal_keeps_the_bn_with_its_reason(reason: Reason, build) -> None:
    model, example = build()
    skip = ["conv-bn"] if reason is Reason.RULE_DISABLED else []
    result = bnfold.fold_module(model, example, skip_rules=skip)

    kept = [decision for decision in result.report.decisions if decision.outcome is Outcome.KEPT]
    assert kept, result.report.to_text()
    assert {decision.reason for decision in kept} == {reason}, result.report.to_text()
    assert all(decision.detail for decision in kept), "every refusal says specifically why"
    assert result.report.folded == []
    if example is not None and reason is not Reason.TRAINING_MODE:
        assert result.verification, result.verification.to_text()


def test_shared_bn_detail_names_both_call_sites() -> None:
    model, example = shared_bn()
    decisions = bnfold.fold_module(model, example).report.decisions
    assert [d.reason for d in decisions] == [Reason.SHARED_MODULE] * 2
    assert {d.detail for d in decisions} == {"module `bn` is called at 2 sites (bn, bn_1)"}


def test_shared_bn_is_refused_through_torch_export_too() -> None:
    model, example = shared_bn()
    result = bnfold.fold_module(model, example, tracer="export")
    assert [d.reason for d in result.report.decisions] == [Reason.SHARED_MODULE] * 2
    assert result.verification


def test_model_in_training_mode_is_a_user_error() -> None:
    model, example = conv_bn()
    model.train()
    with pytest.raises(BnfoldError, match=r"training mode; call model\.eval\(\) first"):
        bnfold.fold_module(model, example)


def test_leaf_bn_with_custom_forward_is_kept() -> None:
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, nets.BatchNormAct2d) or super().is_leaf_module(module, name)

    model = nets.randomized(nets.FunctionalBNNet())
    graph_module = torch.fx.GraphModule(model, LeafTracer().trace(model))
    example = torch.randn(2, 3, 6, 6)
    result = bnfold.fold_module(graph_module, example)
    first, second = result.report.decisions
    assert (first.node, first.outcome, first.reason) == ("bn1", Outcome.KEPT, Reason.CUSTOM_FORWARD)
    assert (second.node, second.outcome) == ("bn2", Outcome.FOLDED)
    assert result.verification


def test_per_sample_norms_are_never_foldable() -> None:
    model = nets.WithGroupNorm().eval()
    result = bnfold.fold_module(model, torch.randn(2, 3, 5, 5))
    assert [(d.node, d.op_type, d.outcome, d.reason) for d in result.report.decisions] == [
        ("norm", "GroupNorm", Outcome.NEVER_FOLDABLE, Reason.PER_SAMPLE_STATISTICS),
        ("instance", "InstanceNorm2d", Outcome.NEVER_FOLDABLE, Reason.PER_SAMPLE_STATISTICS),
    ]


def test_unknown_rule_is_an_error() -> None:
    model, example = conv_bn()
    with pytest.raises(BnfoldError, match="unknown rule"):
        bnfold.fold_module(model, example, skip_rules=["gemm-bn"])
