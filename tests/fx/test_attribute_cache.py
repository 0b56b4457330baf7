"""AttributeCache (the lookups the per-fold index of tensor uses is rebuilt from) answers exactly what
``resolve_attr`` answers, after the edits a fold makes: a module or tensor replaced at the same path,
an attribute deleted, a parametrized weight (a property, computed on every read)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations  # noqa: E402

from bnfold.fx.nodes import AttributeCache, TensorUses, resolve_attr  # noqa: E402

PATHS = ["block", "block.conv", "block.conv.weight", "block.bn.running_mean", "head.weight", "missing.x"]


def model() -> nn.Module:
    root = nn.Module()
    root.block = nn.Module()
    root.block.conv = nn.Conv2d(2, 2, 1)
    root.block.bn = nn.BatchNorm2d(2)
    root.head = nn.Linear(2, 2)
    return root


def agrees(cache: AttributeCache, root: nn.Module) -> None:
    for path in PATHS:
        assert cache.get(path) is resolve_attr(root, path), path


def test_answers_follow_every_edit_a_fold_makes() -> None:
    root = model()
    cache = AttributeCache(root)
    agrees(cache, root)
    root.block.conv = nn.Conv2d(2, 2, 1)  # a module replaced at its path
    agrees(cache, root)
    root.head._parameters.pop("weight")  # a tensor moved from parameter to buffer
    root.head.register_buffer("weight", torch.ones(2, 2))
    agrees(cache, root)
    del root.block.bn  # a module deleted
    agrees(cache, root)
    root.block = nn.Module()  # a parent replaced
    agrees(cache, root)


def test_parametrized_weight_is_read_fresh_every_time() -> None:
    root = model()
    parametrizations.weight_norm(root.head)
    cache = AttributeCache(root)
    first = cache.get("head.weight")
    assert torch.equal(first, resolve_attr(root, "head.weight"))
    with torch.no_grad():
        root.head.parametrizations.weight.original0.mul_(2.0)
    assert torch.equal(cache.get("head.weight"), resolve_attr(root, "head.weight"))
    assert not torch.equal(cache.get("head.weight"), first)


def test_uses_index_sees_a_tied_weight_through_the_cache() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 3)
            self.second = nn.Linear(3, 3)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.second(self.first(x)) + self.first.weight.sum()

    graph_module = torch.fx.symbolic_trace(Tied())
    cache = AttributeCache(graph_module)
    for _ in range(2):  # the second index is built from remembered lookups
        uses = TensorUses(graph_module, cache)
        first = next(node for node in graph_module.graph.nodes if node.target == "first")
        others = {node.name for node in uses.other_sites([graph_module.first.weight], first)}
        assert others == {"second", "sum_1"}
