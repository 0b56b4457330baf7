"""The vocabulary of :mod:`bnfold.fx.shapes`: symbolic shape values and what each torch operation
does to a shape (tables of operations that keep a tensor's shape or rank, and small helpers).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.nn.functional as functional
from torch import fx, nn

__all__ = [
    "Shape",
    "Sizes",
    "Size",
    "proven_equal",
    "batchnorm_ranks",
    "BATCHNORM_RANKS",
    "ELEMENTWISE_MODULES",
    "POOL_MODULES",
    "ELEMENTWISE_NAMES",
    "BINARY_NAMES",
    "SIZE_ARITHMETIC",
    "POOL_FUNCTIONS",
    "CONV_FUNCTIONS",
    "union_of",
    "item_of",
    "reduced",
    "permuted",
    "asserted_rank",
    "size_expr",
    "resolve",
    "pool_rank",
    "spatial_digit",
    "is_torch_function",
]


@dataclass(frozen=True)
class Shape:
    """A tensor's sizes as sympy expressions, and the graph inputs whose example rank they assume."""

    dims: tuple[sympy.Expr, ...]
    assumes: frozenset[str] = frozenset()
    #: the graph inputs whose example rank the *rank* assumes (None: the same as ``assumes``);
    #: ``x.flatten(1)`` has rank 2 for every input, whatever its sizes assume
    rank_assumes: frozenset[str] | None = None

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def rank_assumptions(self) -> frozenset[str]:
        return self.assumes if self.rank_assumes is None else self.rank_assumes

    def derived(self, dims: tuple[sympy.Expr, ...]) -> Shape:
        """A shape computed from this one by an operation that keeps the rank's assumptions."""
        return Shape(tuple(dims), self.assumes, self.rank_assumptions)


@dataclass(frozen=True)
class Sizes:
    """A tuple of sizes read from a tensor (``x.shape``, ``x.size()``), or one size (``x.shape[0]``)."""

    dims: tuple[sympy.Expr, ...]
    assumes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Size:
    expr: sympy.Expr
    assumes: frozenset[str] = frozenset()


def proven_equal(size: sympy.Expr, value: int | sympy.Expr) -> bool:
    """Whether ``size`` equals ``value`` for every value of its symbols."""
    return sympy.simplify(sympy.sympify(size) - sympy.sympify(value)) == 0


BATCHNORM_RANKS = {
    nn.BatchNorm1d: frozenset({2, 3}),
    nn.BatchNorm2d: frozenset({4}),
    nn.BatchNorm3d: frozenset({5}),
}


def batchnorm_ranks(module: nn.Module) -> frozenset[int] | None:
    """The input ranks a BN module accepts, when it is torch's own check that says so (else None).

    A subclass that overrides ``_check_input_dim`` may accept any rank.
    """
    for base, ranks in BATCHNORM_RANKS.items():
        if isinstance(module, base):
            check = type(module)._check_input_dim
            return ranks if check is base._check_input_dim else None
    return None


ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
)
POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
ELEMENTWISE_NAMES = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "gelu",
        "silu",
        "hardswish",
        "hardsigmoid",
        "mish",
        "leaky_relu",
        "elu",
        "hardtanh",
        "softplus",
        "softmax",
        "log_softmax",
        "dropout",
        "clone",
        "contiguous",
        "detach",
        "neg",
        "abs",
        "exp",
        "sqrt",
        "rsqrt",
        "float",
        "half",
        "double",
        "bfloat16",
        "to",
        "type_as",
        "clamp",
        "clamp_",
        "clip",
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
    }
)
BINARY_NAMES = frozenset(
    {
        "add",
        "add_",
        "iadd",
        "sub",
        "sub_",
        "isub",
        "mul",
        "mul_",
        "imul",
        "truediv",
        "div",
        "div_",
        "itruediv",
        "maximum",
        "minimum",
    }
)
SIZE_ARITHMETIC = {"add": operator.add, "iadd": operator.add, "sub": operator.sub, "mul": operator.mul}
POOL_FUNCTIONS = frozenset(
    {
        functional.max_pool1d,
        functional.max_pool2d,
        functional.max_pool3d,
        functional.avg_pool1d,
        functional.avg_pool2d,
        functional.avg_pool3d,
        functional.adaptive_avg_pool1d,
        functional.adaptive_avg_pool2d,
        functional.adaptive_avg_pool3d,
        functional.adaptive_max_pool1d,
        functional.adaptive_max_pool2d,
        functional.adaptive_max_pool3d,
        functional.interpolate,
    }
)
CONV_FUNCTIONS = {
    functional.conv1d: 1,
    functional.conv2d: 2,
    functional.conv3d: 3,
    functional.conv_transpose1d: 1,
    functional.conv_transpose2d: 2,
    functional.conv_transpose3d: 3,
}


def union_of(values: list[Any]) -> frozenset[str]:
    return frozenset().union(*(getattr(value, "assumes", frozenset()) for value in values))


def item_of(value: Any, index: Any) -> Any:
    if isinstance(value, Sizes):
        if isinstance(index, int) and -len(value.dims) <= index < len(value.dims):
            return Size(value.dims[index], value.assumes)
        if isinstance(index, slice):
            return Sizes(value.dims[index], value.assumes)
    return None


def reduced(shape: Any, axes: Any, keep: Any) -> Shape | None:
    """``x.mean(dim, keepdim)``: the reduced axes become 1 (kept) or go."""
    if not isinstance(shape, Shape) or not isinstance(keep, bool) or axes is None:
        return None
    axes = [axes] if isinstance(axes, int) else list(axes) if isinstance(axes, list | tuple) else None
    if not axes or not all(isinstance(axis, int) for axis in axes) or shape.rank == 0:
        return None
    reduced = {axis % shape.rank for axis in axes}
    dims = [
        sympy.Integer(1) if axis in reduced else size
        for axis, size in enumerate(shape.dims)
        if keep or axis not in reduced
    ]
    return shape.derived(tuple(dims))


def permuted(name: str, shape: Shape, args: tuple) -> Shape | None:
    if name == "transpose":
        if len(args) != 2 or not all(isinstance(axis, int) for axis in args):
            return None
        order = list(range(shape.rank))
        first, second = args[0] % shape.rank, args[1] % shape.rank
        order[first], order[second] = order[second], order[first]
    else:
        order = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)
        if sorted(axis % shape.rank for axis in order if isinstance(axis, int)) != list(range(shape.rank)):
            return None
    return shape.derived(tuple(shape.dims[axis % shape.rank] for axis in order))


def asserted_rank(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``torch._assert(x.ndim == k, ...)`` (or ``x.dim() == k``): (x, k)."""
    if node.op != "call_function" or node.target is not torch._assert or not node.args:
        return None
    condition = node.args[0]
    if not isinstance(condition, fx.Node) or condition.target is not operator.eq:
        return None
    left, right = condition.args[:2]
    if isinstance(left, int):
        left, right = right, left
    if not isinstance(right, int) or not isinstance(left, fx.Node):
        return None
    if left.op == "call_function" and left.target is getattr and left.args[1:] == ("ndim",):
        return left.args[0], right
    if left.op == "call_method" and left.target in ("dim", "ndimension") and len(left.args) == 1:
        return left.args[0], right
    return None


def size_expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def resolve(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def pool_rank(module: nn.Module) -> int | None:
    return spatial_digit(type(module).__name__)


def spatial_digit(name: str) -> int | None:
    for digit in ("1d", "2d", "3d"):
        if digit in name:
            return int(digit[0])
    return None


def is_torch_function(target: Any) -> bool:
    module = getattr(target, "__module__", "") or ""
    return module.startswith("torch")
