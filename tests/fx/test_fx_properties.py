"""Property tests for the PyTorch path (issue 12): generated modules whose reshapes depend on sizes that
vary between calls, whose input ranks vary, and with in-place writes between a BN and its fold target.

The property is the promise: on every input the original module accepts, the folded module computes
the same function — or refuses the input loudly (its rank check), never silently computes another.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# y = linear(x) of shape [B, T, C] (B, T read from x.shape): the reshape before the BN.
RESHAPES = {
    "flatten(0, 1)": lambda y, b, t, c: y.flatten(0, 1),
    "reshape(-1, C)": lambda y, b, t, c: y.reshape(-1, c),
    "view(B * T, C)": lambda y, b, t, c: y.view(b * t, c),
    "view(B, C, T)": lambda y, b, t, c: y.view(b, c, t),
    "reshape(B, C, -1)": lambda y, b, t, c: y.reshape(b, c, -1),
    "reshape(-1, C, 1)": lambda y, b, t, c: y.reshape(-1, c, 1),
    "view(B * T, C, 1)": lambda y, b, t, c: y.view(b * t, c, 1),
    "view(T, B * C)": lambda y, b, t, c: y.reshape(t, b * c),
    "reshape(B * T // T, T * C) -> [B, T*C]": lambda y, b, t, c: y.reshape(b, t * c),
    "unflatten then flatten": lambda y, b, t, c: y.unflatten(0, (b, 1)).flatten(0, 2),
}


class TokensLinearBN(torch.nn.Module):
    def __init__(self, features: int, reshape: str, bn_features: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, features)
        self.bn = torch.nn.BatchNorm1d(bn_features)
        self.reshape = RESHAPES[reshape]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, tokens, features = inputs.shape
        return self.bn(self.reshape(self.linear(inputs), batch, tokens, features))


def runs(model, inputs) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return model(inputs)
    except (RuntimeError, ValueError):
        return None


def check_everywhere(result, model, shapes) -> None:
    """Same outputs wherever the original runs; where the folded module refuses, only by its rank check."""
    generator = torch.Generator().manual_seed(11)
    for shape in shapes:
        inputs = torch.randn(shape, generator=generator)
        expected = runs(model, inputs)
        if expected is None:
            continue
        try:
            with torch.no_grad():
                actual = result.module(inputs)
        except AssertionError as error:
            assert "bnfold folded this module" in str(error)
            continue
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(
    reshape=st.sampled_from(sorted(RESHAPES)),
    features=st.integers(2, 4),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 3),
    bn_on_tokens=st.booleans(),
)
def test_reshaped_linear_bn_is_exact_at_every_size(reshape, features, batch, tokens, bn_on_tokens) -> None:
    bn_features = tokens if bn_on_tokens else features
    model = nets.randomized(TokensLinearBN(features, reshape, bn_features))
    example = torch.randn(batch, tokens, features)
    assume(runs(model, example) is not None)
    result = bnfold.fold_module(model, example)
    assert result.verification
    for decision in result.report.kept:
        assert decision.reason is not None and decision.detail
    sizes = {(b, t) for b in (1, 2, 3, 5) for t in (1, 2, 3, 4)}
    check_everywhere(result, model, [(b, t, features) for b, t in sorted(sizes)])
    # A fold that the example alone would allow (axis 1 of the example is the features, the rest 1)
    # but sizes can break is refused with a reason, not decided on the example.
    if tokens == 1 and reshape in ("view(B, C, T)", "reshape(B, C, -1)") and not bn_on_tokens:
        assert [d.reason for d in result.report.kept] == [Reason.SHAPE_DEPENDENT]


@SETTINGS
@given(example_rank=st.sampled_from([2, 3]), features=st.integers(2, 4), flatten_first=st.booleans())
def test_linear_bn_is_exact_or_refuses_other_ranks(example_rank, features, flatten_first) -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(features, features)
            self.bn = torch.nn.BatchNorm1d(features)

        def forward(self, inputs):
            if flatten_first:
                inputs = inputs.flatten(1)
            return self.bn(self.linear(inputs))

    model = nets.randomized(Model())
    example = torch.randn(
        *(
            [3, features]
            if example_rank == 2
            else [3, features, 1]
            if flatten_first
            else [3, features, features]
        )
    )
    assume(runs(model, example) is not None)
    result = bnfold.fold_module(model, example)
    assert result.verification
    shapes = [
        (2, features),
        (5, features),
        (2, features, features),
        (4, features, 1),
        (1, features, features),
    ]
    check_everywhere(result, model, shapes)
    if flatten_first:
        assert "input_rank_checks" not in result.report.extras, "flatten(1) fixes the rank"


def _write(kind: str):
    return {
        "mul_": lambda tensor: tensor.mul_(1.5),
        "add_": lambda tensor: tensor.add_(0.25),
        "relu_": lambda tensor: tensor.relu_(),
        "F.relu(inplace=True)": lambda tensor: torch.nn.functional.relu(tensor, inplace=True),
        "copy_": lambda tensor: tensor.copy_(tensor.flip(-1)),
        "view written": lambda tensor: tensor.view(-1).mul_(-1.0),
        "fill_": lambda tensor: tensor[:, :1].fill_(0.5),
        "clamp_": lambda tensor: tensor.clamp_(min=-0.1),
        "sub_ out=": lambda tensor: torch.sub(tensor, 0.5, out=tensor),
    }[kind]


WRITE_KINDS = [
    "mul_",
    "add_",
    "relu_",
    "F.relu(inplace=True)",
    "copy_",
    "view written",
    "fill_",
    "clamp_",
    "sub_ out=",
]


class WrittenAround(torch.nn.Module):
    """``h = x - 0.3``; a write into ``h`` at ``position``; ``bn(h)`` into a 1x1 conv (bn-conv) or
    ``conv(h) + h`` (branch-merge)."""

    def __init__(self, pattern: str, position: str, write: str) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv = torch.nn.Conv2d(
            4, 4, 1 if pattern == "bn-conv" else 3, padding=0 if pattern == "bn-conv" else 1
        )
        self.pattern, self.position, self.write = pattern, position, _write(write)

    def forward(self, inputs):
        hidden = inputs - 0.3
        if self.position == "before":
            self.write(hidden)
        if self.pattern == "bn-conv":
            normalized = self.bn(hidden)
            if self.position == "between":
                self.write(hidden)
            output = self.conv(normalized)
        else:
            features = self.conv(hidden)
            if self.position == "between":
                self.write(hidden)
            output = features + hidden
        if self.position == "after":
            self.write(hidden)
        return output * hidden.mean()


@SETTINGS
@given(
    pattern=st.sampled_from(["bn-conv", "branch-merge"]),
    position=st.sampled_from(["before", "between", "after"]),
    write=st.sampled_from(WRITE_KINDS),
)
def test_in_place_writes_never_change_the_function(pattern, position, write) -> None:
    model = nets.randomized(WrittenAround(pattern, position, write))
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    changed = result.report.count(Outcome.FOLDED) + len(result.report.merged)
    if position == "between":
        assert changed == 0, result.report.to_text()
        if pattern == "bn-conv":
            assert [d.reason for d in result.report.kept] == [Reason.MUTATED_IN_PLACE]
    else:
        assert changed >= 1, result.report.to_text()
    check_everywhere(result, model, [(2, 4, 5, 5), (1, 4, 3, 6), (3, 4, 7, 2)])
