"""Layer-then-pool-then-BN rules on FX graphs: a BatchNorm after a pooling folded into the Conv /
ConvTranspose before the pool (the torch side of :mod:`bnfold.onnx.rules_pool`).

    Before:  x -Conv(W, b)-> c -pool-> p -BN(s, t)-> y
    After:   x -Conv(W*s, b*s + t)-> c -pool-> y          (the pool stays, the BN goes)

Which pools commute with the BN's map ``x -> s * x + t`` is :func:`bnfold.folds.require_pool_commutes`'
question; this module says what kind each torch pool is (module, ``F.*`` function or ATen call):

- an average of real elements: ``AdaptiveAvgPool*d`` always; ``AvgPool*d`` without ``divisor_override``
  that either counts no padding (``count_include_pad=False``) or has no padding (torch divides a
  ``ceil_mode`` window that runs past the edge by the elements inside ``input + padding``, so with zero
  padding by its real elements);
- a max: ``MaxPool*d`` (implicit ``-inf`` padding never wins) and ``AdaptiveMaxPool*d``, without
  ``return_indices`` (the indices would be a second output).

Refuses: an average that counts zero padding or uses a divisor (``pool-does-not-commute``); a max after
a BN scale < 0 in some channel (same); anything but the BN seeing the pool's output, or anything but the
pool seeing the layer's output; hooks on the pool module; a pool class that overrides ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional

from bnfold.affine import output_channel_count
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import ThroughPool
from bnfold.folds import require_pool_commutes
from bnfold.fx.checks import (
    batchnorm_map,
    require_channel_count,
    require_foldable_pair,
    require_sole_reader,
)
from bnfold.fx.nodes import behaves_like_torch, value_readers
from bnfold.fx.reading import hooks_of, identify, layer_at, norm_input, read_batchnorm
from bnfold.fx.rules_output import plan_output_fold
from bnfold.fx.view import FxView
from bnfold.fx.writing import LayerFold, apply_layer_fold
from bnfold.report import Reason

__all__ = ["LayerPoolBN", "pool_call"]

aten = torch.ops.aten

_MAX = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVERAGE = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_ADAPTIVE_AVERAGE = ("input", "output_size")
_ADAPTIVE_MAX = ("input", "output_size", "return_indices")

# (pool family, positional parameter names) of each function spelling: F.*, torch.*, ATen.
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {}
for _rank in (1, 2, 3):
    _FUNCTIONS[getattr(functional, f"max_pool{_rank}d")] = ("max", _MAX)
    _FUNCTIONS[getattr(torch, f"max_pool{_rank}d")] = ("max", _MAX)
    _FUNCTIONS[getattr(functional, f"avg_pool{_rank}d")] = ("average", _AVERAGE)
    _FUNCTIONS[getattr(functional, f"adaptive_avg_pool{_rank}d")] = ("adaptive-average", _ADAPTIVE_AVERAGE)
    _FUNCTIONS[getattr(functional, f"adaptive_max_pool{_rank}d")] = ("adaptive-max", _ADAPTIVE_MAX)
    _FUNCTIONS[getattr(aten, f"max_pool{_rank}d")] = ("max", _MAX)
    _FUNCTIONS[getattr(aten, f"adaptive_avg_pool{_rank}d")] = ("adaptive-average", _ADAPTIVE_AVERAGE)
    if _rank > 1:
        _FUNCTIONS[getattr(aten, f"avg_pool{_rank}d")] = ("average", _AVERAGE)
        _FUNCTIONS[getattr(aten, f"_adaptive_avg_pool{_rank}d")] = ("adaptive-average", _ADAPTIVE_AVERAGE)
_FUNCTIONS[torch.avg_pool1d] = ("average", _AVERAGE)
_FUNCTIONS[aten.avg_pool1d] = ("average", _AVERAGE)

_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.pooling._MaxPoolNd, "max"),
    (nn.modules.pooling._AvgPoolNd, "average"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive-average"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive-max"),
)
_OPTIONS = ("padding", "ceil_mode", "count_include_pad", "divisor_override", "return_indices")


def _spelling(node: fx.Node) -> tuple[str, tuple[str, ...]] | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None


def pool_call(view: FxView, node: Any) -> tuple[str, Any, dict[str, Any]] | None:
    """(family, data input, options) of a pooling call (module or function), else None.

    Options hold only what was given (module attributes, or the call's arguments by name).
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        module = view.graph_module.get_submodule(str(node.target))
        for klass, family in _MODULES:
            if isinstance(module, klass):
                if len(node.args) != 1 or node.kwargs:
                    return None
                options = {name: getattr(module, name) for name in _OPTIONS if hasattr(module, name)}
                return family, node.args[0], options
        return None
    if node.op != "call_function":
        return None
    spelling = _spelling(node)
    if spelling is None or len(node.args) > len(spelling[1]):
        return None
    family, names = spelling
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    data = bound.pop("input", bound.pop("self", None))
    return family, data, bound


def _pool_kind(family: str, options: dict[str, Any], label: str) -> str:
    """``"average"`` or ``"max"`` for :func:`require_pool_commutes`; Refuse a pool that is neither."""
    if options.get("return_indices", False) is not False:
        raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"{label} also returns indices")
    if family in ("max", "adaptive-max"):
        return "max"
    if family == "adaptive-average":
        return "average"
    divisor = options.get("divisor_override")
    if divisor is not None:
        raise Refuse(
            Reason.POOL_DOES_NOT_COMMUTE, f"{label} divides by divisor_override={divisor}, not a count"
        )
    padding = options.get("padding", 0)
    counts_padding = options.get("count_include_pad", True)
    if not isinstance(counts_padding, bool) or not _is_number_or_numbers(padding):
        raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"{label}'s padding options are computed at run time")
    if counts_padding and any(size != 0 for size in _as_tuple(padding)):
        shown = f"padding={padding}, count_include_pad=True"
        raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"{label} counts its zero padding ({shown})")
    return "average"


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _is_number_or_numbers(value: Any) -> bool:
    return all(isinstance(size, int) and not isinstance(size, bool) for size in _as_tuple(value))


class LayerPoolBN:
    """``layer -> pool -> BN`` for layers of one kind; the pool stays and the BN's readers read it."""

    site = ThroughPool

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind

    def find(self, view: FxView, node: fx.Node) -> ThroughPool | None:
        call = identify(view, node)
        if call is None or call.kind != "batchnorm":
            return None
        pool = norm_input(call)
        found = pool_call(view, pool)
        if found is None:
            return None
        layer = view.layer_node(found[1], (self.kind,))
        return ThroughPool(norm=node, pool=pool, layer=layer) if layer is not None else None

    def plan(self, view: FxView, site: ThroughPool) -> LayerFold:
        batchnorm = read_batchnorm(view, identify(view, site.norm))
        layer = layer_at(view, site.layer)
        require_foldable_pair(view, batchnorm, layer)
        pool: fx.Node = site.pool
        label = view.describe(pool)
        if pool.op == "call_module":
            module = view.graph_module.get_submodule(str(pool.target))
            if not behaves_like_torch(module):
                detail = f"{label}, whose class {type(module).__qualname__} overrides forward()"
                raise Refuse(Reason.NO_FOLDABLE_PRODUCER, detail)
            if hooks_of(module):
                raise Refuse(Reason.HOOKS_REGISTERED, f"{label} has {hooks_of(module)}")
        # The pool's output becomes the BN's: nothing else may see it (readers of its shape may).
        others = [user for user in value_readers(pool) if user is not batchnorm.node]
        if any(user.op == "output" for user in others):
            raise Refuse(Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"the output of {label} is returned")
        if others:
            names = ", ".join(user.name for user in others[:3])
            raise Refuse(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"the output of {label} also feeds {names}")
        family, _, options = pool_call(view, pool)
        channels = output_channel_count(tuple(layer.weight.shape), layer.layout, layer.groups)
        require_channel_count(batchnorm, layer, channels, "output")
        require_pool_commutes(batchnorm_map(batchnorm, channels), _pool_kind(family, options, label), label)
        require_sole_reader(layer, pool)
        # Pools keep the rank: the BN's axis 1 is the layer's channel axis where it is on the layer's output.
        return plan_output_fold(view, batchnorm, layer, layer.node)

    def apply(self, view: FxView, plan: LayerFold) -> Applied:
        return Applied(apply_layer_fold(view, plan))
