"""What one torch fold knows about its graph: :class:`FoldState`.

The graph module being folded, the model it came from (for class names), who uses which tensor
(:class:`~bnfold.fx.nodes.TensorUses`), the in-place writes (:class:`~bnfold.fx.effects.Effects`),
the shape facts (:class:`~bnfold.fx.shapes.ShapeFacts`), the float64 values of the tensors folds
wrote (:class:`TensorExactValues`, over the core's :class:`~bnfold.core.exact.ExactValues`), and the
graph inputs whose example rank an applied fold relied on. It belongs to one fold: nothing here is
module-level state. :class:`bnfold.fx.view.FxView` extends it with what the core driver asks.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.affine import Rounded
from bnfold.core.exact import ExactValues
from bnfold.fx.effects import Effects
from bnfold.fx.nodes import AttributeCache, TensorUses, resolve_attr
from bnfold.fx.shapes import ShapeFacts

__all__ = [
    "EXACT_VALUES_BUDGET",
    "FoldState",
    "TensorExactValues",
    "numpy64",
    "numpy_of",
    "numpy_dtype",
]

#: Bytes of float64 values a torch fold keeps for chains of folds (read when a fold starts).
EXACT_VALUES_BUDGET = 256 * 2**20


def numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes  # an onnx dependency; numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype])


class TensorExactValues:
    """The float64 values folded tensors were rounded from, so a chain of folds rounds once.

    Keyed by the tensor's storage (the Parameter made from a rounded tensor shares it); the tensor is
    held while its entry lives, so that its storage cannot be freed and reused by another tensor.
    Beyond the budget the oldest entries go (a later fold then starts from the rounded tensor: one
    more rounding, never a wrong value).
    """

    def __init__(self, budget: int) -> None:
        self._values = ExactValues(budget)
        self._held: dict[Hashable, torch.Tensor] = {}

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)

    def remember(self, tensor: torch.Tensor, rounded: np.ndarray) -> None:
        key = self._key(tensor)
        self._values.remember(key, rounded)
        if self._values.get(key) is not None:
            self._held[key] = tensor
        for stale in [held for held in self._held if self._values.get(held) is None]:
            del self._held[stale]

    def float64(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` in float64: the value a fold rounded it from, when one did."""
        entry = self._values.get(self._key(tensor))
        if isinstance(entry, Rounded) and entry.exact is not None:
            return entry.exact
        return numpy64(tensor)

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` as a numpy array in its own dtype, carrying the float64 value it was rounded
        from when a fold made it (a :class:`~bnfold.affine.Rounded`, as :mod:`bnfold.folds` takes)."""
        entry = self._values.get(self._key(tensor))
        if isinstance(entry, Rounded) and entry.exact is not None:
            return entry
        return numpy_of(tensor)

    def tensor(self, values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """A new tensor of ``values`` (already rounded into ``like``'s dtype) on ``like``'s device;
        remembered when ``values`` carries its float64 value."""
        plain = np.ascontiguousarray(np.asarray(values).view(np.ndarray))
        if like.dtype == torch.bfloat16:
            tensor = torch.from_numpy(plain.view(np.uint16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(plain)
        tensor = tensor.to(like.device)
        self.remember(tensor, values)
        return tensor


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array of the same dtype (bfloat16 through ml_dtypes), on the CPU."""
    detached = tensor.detach().to("cpu")
    if detached.dtype == torch.bfloat16:
        return detached.view(torch.uint16).numpy().view(numpy_dtype(torch.bfloat16))
    return detached.numpy()


class FoldState:
    """The graph being folded and the facts every rule reads (see the module docstring).

    ``trusted_shapes``: the graph's shape metadata is enforced by the module (torch.export).
    ``input_ranks``: whether a fold may rely on a graph input having its example's rank (see
    :class:`~bnfold.fx.shapes.ShapeFacts`).
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        root: nn.Module | None = None,
        *,
        trusted_shapes: bool = False,
        input_ranks: bool = True,
    ):
        self.graph_module = graph_module
        self.root = root
        self.trusted_shapes = trusted_shapes
        self.exact = TensorExactValues(EXACT_VALUES_BUDGET)
        # Shapes are computed once: a fold gives the folded layer's output the BN output's shape.
        self.facts = ShapeFacts(graph_module, trusted=trusted_shapes, input_ranks=input_ranks)
        self.assumed_ranks: dict[str, int] = {}
        self._uses: TensorUses | None = None
        self._attributes = AttributeCache(graph_module)  # kept across rebuilds of the uses index
        self._effects: Effects | None = None
        self._known_effects: dict[fx.Node, tuple] = {}

    @property
    def uses(self) -> TensorUses:
        """Who uses which tensor (indexed when first asked after a change)."""
        if self._uses is None:
            self._uses = TensorUses(self.graph_module, self._attributes)
        return self._uses

    @property
    def effects(self) -> Effects:
        """The graph's in-place writes and storage classes (indexed when first asked after a change)."""
        if self._effects is None:
            self._effects = Effects(self.graph_module, self._known_effects)
        return self._effects

    def refresh(self) -> None:
        """Forget the indexes of uses and in-place writes; call after the graph or its modules changed."""
        self._uses = None
        self._effects = None

    def assume(self, inputs: frozenset[str]) -> None:
        """Record that an applied fold relies on these graph inputs having their example rank."""
        for name in inputs:
            rank = self.facts.example_rank(name)
            if rank is not None:
                self.assumed_ranks[name] = rank

    def module_at(self, path: str) -> nn.Module | None:
        """The module at ``path`` in the original model (real classes), else in the graph module."""
        for root in (self.root, self.graph_module):
            if root is None:
                continue
            found: Any = resolve_attr(root, path) if path else root
            if isinstance(found, nn.Module) and type(found) is not nn.Module:
                return found
        return None
