"""Shape facts that hold for every input a module accepts, not only for the example.

A fold may rely on a tensor's rank (a Linear's features are on the BN's axis 1 only for 2-D output;
a Conv1d's channels only for batched input) and, through a reshape, on its sizes (``bn(linear(x)
.view(B, 4, T))`` keeps the features on axis 1 only when ``T`` is 1). ShapeProp on the example
inputs gives sizes that hold for the example only: a symbolic_trace graph accepts inputs of any size
and any rank. So sizes are symbols here, and each node's shape is derived from the graph:

- **torch.export graphs** carry their shapes in ``node.meta['val']``: static sizes are guarded by the
  exported module (it refuses other sizes) and dynamic ones are symbols, so they are facts as given;
  its guards do not check the rank, so a folded exported module checks its inputs' ranks
  (``bnfold.fx.fold``).
- **symbolic_trace graphs**: each graph input gets the rank of its example (the only thing taken from
  the example; a fold that relies on it makes the folded module check that rank, see
  :meth:`ShapeFacts.assumed_ranks`) and a fresh symbol per size. Shapes then follow the graph through
  the operations whose output shape is known (layers, activations, arithmetic, flatten / reshape /
  view with sizes read from other tensors, permutes, pools, ...); anything else has no known shape.
  ``torch._assert(x.ndim == 4)`` (timm's BatchNormAct2d) and ``x.dim() == 4`` prove a rank outright.

A size is proven equal to a number only when the symbolic expressions are identical (sympy), never
from the example's values: the example shows only whether a fact that is not proven *happens* to
hold for it, which decides between the refusal codes ``shape-dependent`` and a plain mismatch.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import sympy
import torch
import torch.nn.functional as functional
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnfold.fx.nodes import BATCHNORM_MODULES, PER_SAMPLE_MODULES, output_shape
from bnfold.fx.shape_ops import (
    BINARY_NAMES,
    CONV_FUNCTIONS,
    ELEMENTWISE_MODULES,
    ELEMENTWISE_NAMES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    SIZE_ARITHMETIC,
    Shape,
    Size,
    Sizes,
    asserted_rank,
    batchnorm_ranks,
    is_torch_function,
    item_of,
    permuted,
    pool_rank,
    proven_equal,
    reduced,
    resolve,
    size_expr,
    spatial_digit,
    union_of,
)

__all__ = ["Shape", "ShapeFacts", "batchnorm_ranks", "proven_equal"]


class ShapeFacts:
    """The shape of every node that the graph fixes; see the module docstring.

    ``trusted``: the graph comes from torch.export, whose shape metadata the module enforces.
    ``input_ranks``: an untrusted graph's inputs may take their example's rank (the folded module
    then checks it); False for a subgraph, whose inputs the folded module cannot check.
    """

    def __init__(self, graph_module: fx.GraphModule, *, trusted: bool, input_ranks: bool = True) -> None:
        self._root = graph_module
        self._trusted = trusted
        self._input_ranks = input_ranks
        self._values: dict[fx.Node, Any] = {}
        self._asserted: dict[fx.Node, int] = {}
        self._fresh = itertools.count()
        self._example_ranks: dict[str, int] = {}
        # Sizes a layer fixes for every input it accepts (a Linear's input has in_features last),
        # with the graph inputs whose example rank that assumes.
        self._known: dict[sympy.Symbol, tuple[sympy.Integer, frozenset[str]]] = {}
        nodes = list(graph_module.graph.nodes)
        for node in nodes:
            asserted = asserted_rank(node)
            if asserted is not None:
                self._asserted[asserted[0]] = asserted[1]
        for node in nodes:
            try:
                value = self._compute(node)
            except Exception:  # a shape rule that does not apply to these arguments: unknown
                value = None
            if node in self._asserted:
                value = self._with_asserted_rank(value, self._asserted[node])
            if value is not None:
                self._values[node] = value

    # -- queries ---------------------------------------------------------------------------------
    def shape(self, node: Any) -> Shape | None:
        value = self._values.get(node) if isinstance(node, fx.Node) else None
        if not isinstance(value, Shape) or not self._known:
            return value if isinstance(value, Shape) else None
        symbols = set().union(*(sympy.sympify(size).free_symbols for size in value.dims))
        used = [symbol for symbol in symbols if symbol in self._known]
        if not used:
            return value
        substitutions = {symbol: self._known[symbol][0] for symbol in used}
        assumes = value.assumes.union(*(self._known[symbol][1] for symbol in used))
        dims = tuple(sympy.sympify(size).subs(substitutions) for size in value.dims)
        return Shape(dims, assumes, value.rank_assumptions)

    def _learn(self, source: Shape, axis: int, size: int) -> None:
        """Every input a layer accepts has ``size`` on ``axis`` of ``source``: remember it for its symbol."""
        if -source.rank <= axis < source.rank and isinstance(source.dims[axis], sympy.Symbol):
            self._known.setdefault(source.dims[axis], (sympy.Integer(size), source.assumes))

    def rank(self, node: Any) -> tuple[int, frozenset[str]] | None:
        """(rank, graph inputs whose example rank it assumes), or None when unknown."""
        if isinstance(node, fx.Node) and node in self._asserted:
            return self._asserted[node], frozenset()
        shape = self.shape(node)
        return (shape.rank, shape.rank_assumptions) if shape is not None else None

    def example_rank(self, name: str) -> int | None:
        return self._example_ranks.get(name)

    # -- propagation -----------------------------------------------------------------------------
    def _fresh_symbol(self) -> sympy.Symbol:
        return sympy.Symbol(f"size{next(self._fresh)}", positive=True, integer=True)

    def _with_asserted_rank(self, value: Any, rank: int) -> Shape | None:
        if isinstance(value, Shape) and value.rank == rank:
            return value
        return Shape(tuple(self._fresh_symbol() for _ in range(rank)))

    def _compute(self, node: fx.Node) -> Any:
        if self._trusted:
            return self._from_meta(node)
        if node.op == "placeholder":
            shape = output_shape(node) if self._input_ranks else None
            if shape is None:
                return None
            self._example_ranks[node.name] = len(shape)
            dims = tuple(
                sympy.Symbol(f"{node.name}_{axis}", positive=True, integer=True) for axis in range(len(shape))
            )
            return Shape(dims, frozenset({node.name}))
        if node.op == "get_attr":
            value = resolve(self._root, str(node.target))
            if isinstance(value, torch.Tensor):
                return Shape(tuple(sympy.Integer(size) for size in value.shape))
            return None
        if node.op == "call_module":
            return self._module(node, self._root.get_submodule(str(node.target)))
        if node.op in ("call_function", "call_method"):
            return self._function(node)
        return None

    def _from_meta(self, node: fx.Node) -> Any:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return Shape(tuple(size_expr(size) for size in value.shape))
        if isinstance(value, torch.SymInt | int) and not isinstance(value, bool):
            return Size(size_expr(value))
        return None

    def _get(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self._values.get(value)
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return Size(sympy.Integer(value))
        if isinstance(value, list | tuple):
            items = [self._get(item) for item in value]
            if all(isinstance(item, Size) for item in items):
                return Sizes(tuple(item.expr for item in items), union_of(items))
        return None

    def _module(self, node: fx.Node, module: nn.Module) -> Any:
        source = self.shape(node.args[0]) if node.args else None
        if isinstance(module, BATCHNORM_MODULES) or isinstance(module, PER_SAMPLE_MODULES):
            ranks = batchnorm_ranks(module) if isinstance(module, _BatchNorm) else None
            if source is None and ranks is not None and len(ranks) == 1:
                (rank,) = ranks
                dims = [self._fresh_symbol() for _ in range(rank)]
                dims[1] = sympy.Integer(module.num_features)
                return Shape(tuple(dims))
            return source
        if isinstance(module, ELEMENTWISE_MODULES):
            return source
        if source is None:
            return None
        if isinstance(module, _ConvNd):
            self._learn(source, source.rank - len(module.kernel_size) - 1, module.in_channels)
            return self._conv(source, module.weight.shape, module.transposed, len(module.kernel_size))
        if isinstance(module, nn.Linear):
            self._learn(source, -1, module.in_features)
            return source.derived((*source.dims[:-1], sympy.Integer(module.out_features)))
        if isinstance(module, POOL_MODULES):
            spatial = pool_rank(module)
            return self._spatial_unknown(source, spatial if spatial else source.rank - 2)
        if isinstance(module, nn.Flatten):
            return self._flatten(source, module.start_dim, module.end_dim)
        return None

    def _conv(self, source: Shape, weight_shape: torch.Size, transposed: bool, spatial: int) -> Shape | None:
        if source.rank not in (spatial + 1, spatial + 2):
            return None
        channels = weight_shape[1] if transposed else weight_shape[0]
        if transposed:  # [C_in, C_out/groups, k...]: output channels need groups; keep them unknown
            channels_expr: sympy.Expr = self._fresh_symbol()
        else:
            channels_expr = sympy.Integer(channels)
        batch = source.dims[: source.rank - spatial - 1]
        spatial_dims = tuple(self._fresh_symbol() for _ in range(spatial))
        return source.derived((*batch, channels_expr, *spatial_dims))

    def _spatial_unknown(self, source: Shape, spatial: int | None) -> Shape | None:
        if spatial is None or source.rank < spatial + 1:
            return None
        kept = source.dims[: source.rank - spatial]
        return source.derived((*kept, *(self._fresh_symbol() for _ in range(spatial))))

    def _flatten(self, source: Shape | None, start: Any, end: Any) -> Shape | None:
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        if source is None:
            # flatten(start >= 0) to the last axis has rank start + 1 whatever its input's rank.
            if end == -1 and start >= 0:
                return Shape(tuple(self._fresh_symbol() for _ in range(start + 1)))
            return None
        rank = source.rank
        first, last = start % rank if rank else 0, end % rank if rank else 0
        if first > last:
            return None
        merged = sympy.Mul(*source.dims[first : last + 1])
        dims = (*source.dims[:first], merged, *source.dims[last + 1 :])
        # flatten(start >= 0) to the last axis has rank start + 1 whatever its input's rank.
        rank_assumes = frozenset() if end == -1 and start >= 0 else source.rank_assumptions
        return Shape(dims, source.assumes, rank_assumes)

    def _function(self, node: fx.Node) -> Any:
        target = node.target
        name = target if node.op == "call_method" else getattr(target, "__name__", "")
        args, kwargs = node.args, node.kwargs
        first = self._get(args[0]) if args else None
        if target is getattr:
            return self._attribute(first, args[1])
        if target is operator.getitem:
            return item_of(first, args[1])
        if node.op == "call_method" and name in ("size", "dim", "numel", "ndimension"):
            return self._size_method(name, first, args[1:], kwargs)
        if target is torch._assert:
            return None
        if target in CONV_FUNCTIONS:
            weight = self.shape(args[1]) if len(args) > 1 else self.shape(kwargs.get("weight"))
            if not isinstance(first, Shape) or weight is None:
                return None
            transposed = "transpose" in name
            sizes = torch.Size(int(size) for size in weight.dims)
            return self._conv(first, sizes, transposed, CONV_FUNCTIONS[target])
        if target is functional.linear:
            weight = self.shape(args[1]) if len(args) > 1 else self.shape(kwargs.get("weight"))
            if isinstance(first, Shape) and weight is not None:
                return first.derived((*first.dims[:-1], weight.dims[0]))
            return None
        if target in POOL_FUNCTIONS:
            if not isinstance(first, Shape):
                return None
            spatial = spatial_digit(name)
            return self._spatial_unknown(first, spatial if spatial else first.rank - 2)
        if name in ELEMENTWISE_NAMES and (node.op == "call_method" or is_torch_function(target)):
            return first if isinstance(first, Shape) else None
        if name in BINARY_NAMES or target in (operator.add, operator.sub, operator.mul, operator.truediv):
            return self._binary(name, [self._get(arg) for arg in args[:2]])
        if target is operator.floordiv:
            values = [self._get(arg) for arg in args[:2]]
            if all(isinstance(value, Size) for value in values):
                return Size(sympy.floor(values[0].expr / values[1].expr), union_of(values))
            return None
        if name == "flatten" and (node.op == "call_method" or target is torch.flatten):
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(first if isinstance(first, Shape) else None, start, end)
        if name in ("reshape", "view") and (node.op == "call_method" or target is torch.reshape):
            sizes = args[1:] if node.op == "call_method" else args[1:2]
            if "shape" in kwargs:
                sizes = (kwargs["shape"],)
            if len(sizes) == 1 and isinstance(sizes[0], list | tuple | fx.Node):
                sizes = sizes[0]
            return self._reshape(first if isinstance(first, Shape) else None, sizes)
        if name in ("reshape_as", "view_as", "expand_as") and node.op == "call_method":
            other = self.shape(args[1]) if len(args) > 1 else None
            return other
        if name == "unsqueeze" and isinstance(first, Shape):
            axis = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(axis, int):
                axis = axis % (first.rank + 1)
                return first.derived((*first.dims[:axis], sympy.Integer(1), *first.dims[axis:]))
            return None
        if name in ("permute", "transpose") and isinstance(first, Shape):
            return permuted(name, first, args[1:])
        reduction = name in ("mean", "sum", "amax", "amin")
        if reduction and (node.op == "call_method" or is_torch_function(target)):
            axes = kwargs.get("dim", args[1] if len(args) > 1 else None)
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            return reduced(first, axes, keep)
        if target is torch.cat and args:
            return self._cat(args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
        return None

    def _attribute(self, value: Any, attribute: Any) -> Any:
        if not isinstance(value, Shape):
            return None
        if attribute == "shape":
            return Sizes(value.dims, value.assumes)
        if attribute == "ndim":
            return Size(sympy.Integer(value.rank), value.assumes)
        return None

    def _size_method(self, name: str, value: Any, args: tuple, kwargs: dict) -> Any:
        if not isinstance(value, Shape):
            return None
        if name in ("dim", "ndimension"):
            return Size(sympy.Integer(value.rank), value.assumes)
        if name == "numel":
            return Size(sympy.Mul(*value.dims), value.assumes)
        axis = args[0] if args else kwargs.get("dim")
        if axis is None:
            return Sizes(value.dims, value.assumes)
        if isinstance(axis, int) and -value.rank <= axis < value.rank:
            return Size(value.dims[axis], value.assumes)
        return None

    def _binary(self, name: str, values: list[Any]) -> Any:
        if len(values) != 2 or any(value is None for value in values):
            return None
        shapes = [value for value in values if isinstance(value, Shape)]
        if not shapes:
            if all(isinstance(value, Size) for value in values):
                left, right = values[0].expr, values[1].expr
                function = SIZE_ARITHMETIC.get(name.rstrip("_"))
                return Size(function(left, right), union_of(values)) if function else None
            return None
        if len(shapes) == 1:  # a tensor and a number
            return shapes[0]
        first, second = shapes
        if name.endswith("_") or name.startswith("i"):
            return first  # in place: the result has the shape of the tensor written into
        rank = max(first.rank, second.rank)
        dims = []
        for axis in range(-rank, 0):
            sizes = [shape.dims[axis] for shape in shapes if shape.rank >= -axis]
            distinct = {size for size in sizes if size != 1}
            if not distinct:
                dims.append(sympy.Integer(1))
            else:  # one size, or sizes whose broadcast is not known symbolically
                dims.append(distinct.pop() if len(distinct) == 1 else self._fresh_symbol())
        rank_assumes = first.rank_assumptions | second.rank_assumptions
        return Shape(tuple(dims), first.assumes | second.assumes, rank_assumes)

    def _reshape(self, source: Shape | None, sizes: Any) -> Shape | None:
        listed = sizes if isinstance(sizes, list | tuple) else [sizes]
        values = [self._get(size) for size in listed]
        if len(values) == 1 and isinstance(values[0], Sizes):  # reshape(other.shape)
            return Shape(values[0].dims, values[0].assumes)
        dims: list[sympy.Expr | None] = []
        assumes: frozenset[str] = frozenset()
        for size, value in zip(listed, values, strict=True):
            if isinstance(size, int) and size == -1:
                dims.append(None)
            elif isinstance(value, Size):
                dims.append(value.expr)
                assumes |= value.assumes
            else:
                dims.append(self._fresh_symbol())
        if dims.count(None) > 1:
            return None
        if None in dims:
            known = sympy.Mul(*[dim for dim in dims if dim is not None])
            if source is None:
                inferred: sympy.Expr = self._fresh_symbol()
            else:
                inferred = sympy.simplify(sympy.Mul(*source.dims) / known)
                assumes |= source.assumes
            dims[dims.index(None)] = inferred
        return Shape(tuple(dims), assumes, frozenset())  # the rank is the number of sizes given

    def _cat(self, tensors: Any, axis: Any) -> Shape | None:
        if not isinstance(tensors, list | tuple) or not tensors or not isinstance(axis, int):
            return None
        shapes = [self.shape(tensor) for tensor in tensors]
        if any(shape is None for shape in shapes) or len({shape.rank for shape in shapes}) != 1:
            return None
        first = shapes[0]
        axis %= first.rank
        total = sympy.Add(*[shape.dims[axis] for shape in shapes])
        assumes = frozenset().union(*(shape.assumes for shape in shapes))
        rank_assumes = frozenset().union(*(shape.rank_assumptions for shape in shapes))
        return Shape((*first.dims[:axis], total, *first.dims[axis + 1 :]), assumes, rank_assumes)
