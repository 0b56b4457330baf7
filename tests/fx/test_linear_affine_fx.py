"""linear-affine on the PyTorch path: ``linear(x) * c + d`` with constants that vary along the last
(feature) axis only fold into the Linear, for inputs of any rank; constants that vary along another
axis, could add axes to the output, or are not constants of the layer's dtype are left alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome  # noqa: E402
from bnfold.report import Reason  # noqa: E402

FEATURES = 4


class LinearScaleShift(nn.Module):
    """A Linear, then ``*``, ``+``, ``-``, ``/`` by buffers, parameters and numbers."""

    def __init__(self, scale_shape, shift_shape, spelled: str = "operators") -> None:
        super().__init__()
        self.linear = nn.Linear(3, FEATURES)
        self.register_buffer("scale", torch.rand(scale_shape) + 0.5)
        self.shift = nn.Parameter(torch.randn(shift_shape))
        self.spelled = spelled

    def forward(self, inputs):
        if self.spelled == "functional":
            features = F.linear(inputs, self.linear.weight, self.linear.bias)
            return torch.sub(torch.div(features, self.scale), self.shift)
        features = self.linear(inputs)
        if self.spelled == "operators":
            return 1.5 - (features * self.scale + self.shift - 0.25) / 2.0
        return features.mul(self.scale).add(self.shift)


def same_at(result, model, *shapes) -> None:
    for shape in shapes:
        inputs = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def affine_rows(result) -> set[tuple[str, Outcome]]:
    return {(d.rule, d.outcome) for d in result.report.decisions}


CONSTANT_SHAPES = [
    ((FEATURES,), (FEATURES,)),
    ((1, FEATURES), (1,)),
    ((1, 1, FEATURES), (1, 1, 1)),
    ((), (1,)),
]
EXAMPLES = [(2, 3), (2, 5, 3), (2, 2, 5, 3)]
# Constants with no more axes than the output (more: test_constant_that_may_add_axes_is_left_alone).
FITTING = [
    (shapes, example) for shapes in CONSTANT_SHAPES for example in EXAMPLES if len(shapes[0]) <= len(example)
]


@pytest.mark.parametrize("spelled", ["operators", "methods", "functional"])
@pytest.mark.parametrize(("shapes", "example"), FITTING)
def test_per_feature_chain_folds_into_the_linear(shapes, spelled, example) -> None:
    torch.manual_seed(0)
    model = LinearScaleShift(*shapes, spelled=spelled).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = bnfold.fold_module(model, torch.randn(example))
    expected_rows = {"operators": 5, "methods": 2, "functional": 2}[spelled]
    assert affine_rows(result) == {("linear-affine", Outcome.FOLDED)}, result.report.to_text()
    assert len(result.report.decisions) == expected_rows
    arithmetic = {"mul", "add", "sub", "div", "truediv", "rsub"}
    left = [
        n for n in result.module.graph.nodes if getattr(n.target, "__name__", str(n.target)) in arithmetic
    ]
    assert left == [], [n.format_node() for n in left]
    other_size = (*example[:-2], example[-2] + 3, 3) if len(example) > 1 else example
    same_at(result, model, example, other_size)
    for name, tensor in model.state_dict().items():  # the original model is untouched
        assert torch.equal(tensor, before[name]), name


def test_feature_vector_folds_for_any_input_rank_without_a_rank_check() -> None:
    """A ``[F]`` constant broadcasts along the last axis at every rank: no rank is assumed."""
    model = LinearScaleShift((FEATURES,), (FEATURES,)).eval()
    result = bnfold.fold_module(model, torch.randn(2, 3))
    assert affine_rows(result) == {("linear-affine", Outcome.FOLDED)}
    assert not result.report.extras.get("input_rank_checks")
    same_at(result, model, (2, 3), (3,), (4, 2, 3), (1, 2, 2, 3))


def test_folds_without_example_inputs() -> None:
    model = LinearScaleShift((FEATURES,), (1,), spelled="methods").eval()
    result = bnfold.fold_module(model)
    assert affine_rows(result) == {("linear-affine", Outcome.FOLDED)}
    same_at(result, model, (3,), (2, 3), (2, 5, 3))


def test_constant_that_may_add_axes_is_left_alone() -> None:
    """A ``[1, F]`` constant after a Linear on a 1-D input would make the output 2-D; without a rank
    known for every input it is not folded either."""
    for example in ((3,), None):
        model = LinearScaleShift((1, FEATURES), (1,), spelled="methods").eval()
        result = bnfold.fold_module(model, torch.randn(example) if example else None)
        assert all(d.node != "mul" for d in result.report.folded), result.report.to_text()
        same_at(result, model, (3,), (2, 3))


@pytest.mark.parametrize(
    ("scale_shape", "example"),
    [
        ((3, FEATURES), (2, 3, 3)),
        ((FEATURES, 1), (2, FEATURES, 3)),
        ((2, 1, FEATURES), (2, 5, 3)),
        ((5,), None),
    ],
)
def test_constant_that_is_not_per_feature_is_left_alone(scale_shape, example) -> None:
    model = LinearScaleShift(scale_shape, (1,), spelled="methods").eval()
    if example is None:  # [5] never broadcasts with [..., 4]: nothing runs, only the refusal matters
        result = bnfold.fold_module(model)
        assert all(d.node != "mul" for d in result.report.folded), result.report.to_text()
        return
    result = bnfold.fold_module(model, torch.randn(example))
    assert all(d.node != "mul" for d in result.report.folded), result.report.to_text()
    same_at(result, model, example)


def test_refusal_reasons_use_the_existing_vocabulary() -> None:
    """The rule's plan refuses with CHANNEL_AXIS_MISMATCH / SHAPE_DEPENDENT / UNSUPPORTED_DTYPE."""
    from bnfold.core.refuse import Refuse
    from bnfold.fx.rules import RULES
    from bnfold.fx.trace import trace
    from bnfold.fx.view import FxView

    rule = next(rule for rule in RULES if rule.name == "linear-affine")
    cases = [
        ((3, FEATURES), torch.float32, (2, 3, 3), Reason.CHANNEL_AXIS_MISMATCH),
        ((1, FEATURES), torch.float32, (3,), Reason.SHAPE_DEPENDENT),
        ((FEATURES,), torch.float64, (2, 3), Reason.UNSUPPORTED_DTYPE),
    ]
    for scale_shape, dtype, example, reason in cases:
        model = LinearScaleShift(scale_shape, (1,), spelled="methods").eval()
        model.scale = model.scale.to(dtype)
        traced = trace(model, (torch.randn(example),))
        view = FxView(traced.graph_module, root=model)
        site = next(site for node in view.live_nodes() if (site := rule.find(view, node)) is not None)
        with pytest.raises(Refuse) as refused:
            rule.plan(view, site)
        assert refused.value.reason is reason, (scale_shape, refused.value)


def test_linear_output_read_elsewhere_is_left_alone() -> None:
    class Reused(LinearScaleShift):
        def forward(self, inputs):
            features = self.linear(inputs)
            return features * self.scale + features

    model = Reused((FEATURES,), (1,)).eval()
    result = bnfold.fold_module(model, torch.randn(2, 3))
    assert result.report.folded == []
    same_at(result, model, (2, 3))


def test_a_chain_after_a_folded_bn_folds_into_the_same_linear() -> None:
    class LinearBNScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, FEATURES)
            self.bn = nn.BatchNorm1d(FEATURES)
            self.register_buffer("scale", torch.rand(FEATURES) + 0.5)

        def forward(self, inputs):
            return self.bn(self.linear(inputs)) * self.scale - 1.0

    torch.manual_seed(1)
    model = LinearBNScale()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.normal_()
    model.eval()
    result = bnfold.fold_module(model, torch.randn(5, 3))
    rules = {(d.rule, d.outcome) for d in result.report.decisions}
    assert rules == {("linear-bn", Outcome.FOLDED), ("linear-affine", Outcome.FOLDED)}, (
        result.report.to_text()
    )
    same_at(result, model, (5, 3), (7, 3))


def test_skip_rule_leaves_the_chain() -> None:
    model = LinearScaleShift((FEATURES,), (FEATURES,)).eval()
    result = bnfold.fold_module(model, torch.randn(2, 3), skip_rules=["linear-affine"])
    assert result.report.folded == []
    same_at(result, model, (2, 3))


@pytest.mark.parametrize("spelled", ["operators", "methods"])
def test_torch_export_spelling_folds_too(spelled) -> None:
    """torch.export spells them aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor."""
    model = LinearScaleShift((FEATURES,), (1, FEATURES), spelled=spelled).eval()
    example = torch.randn(2, 5, 3)
    result = bnfold.fold_module(model, example, tracer="export")
    assert result.tracer == "torch.export"
    assert affine_rows(result) == {("linear-affine", Outcome.FOLDED)}, result.report.to_text()
    # `1.5 - y` becomes aten.rsub.Scalar, which the rule does not read: left in the graph.
    assert len(result.report.decisions) == (4 if spelled == "operators" else 2)
    assert result.verification, result.verification.to_text()
    same_at(result, model, (2, 5, 3))
