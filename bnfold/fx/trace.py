"""Turn a torch model into an FX GraphModule to fold: symbolic_trace first, torch.export as fallback.

``symbolic_trace`` needs no inputs and keeps torch's layers as modules, so the folded model keeps the
user's module hierarchy and state_dict names. It cannot follow Python control flow on tensor values
or shapes (``if x.shape[-1] > 8``, ``len(x)``); with ``example_inputs`` such models go through
``torch.export`` (non-strict), whose graph is specialised to the example shapes (pass
``dynamic_shapes`` to keep dimensions symbolic) and guarded: the folded module raises on inputs that
would have taken another path, instead of computing something else. Neither tracer can capture a
branch on tensor *values* (``if x.sum() > 0``); such a model must express it with ``torch.cond``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import BnfoldError
from bnfold.fx.nodes import behaves_like_torch, module_kind

__all__ = [
    "Traced",
    "BnfoldTracer",
    "trace",
    "as_args",
    "is_exported_module",
    "propagate_shapes",
    "preserved_buffers",
    "input_copies",
    "TRACERS",
    "first_line",
]

logger = logging.getLogger(__name__)

SYMBOLIC_TRACE = "torch.fx.symbolic_trace"
TORCH_EXPORT = "torch.export"
GRAPH_MODULE = "graph-module"
TRACERS = ("auto", "fx", "export")


@dataclass
class Traced:
    """A GraphModule to fold, which tracer made it, and why the first choice failed (if it did)."""

    graph_module: fx.GraphModule
    tracer: str
    fallback_reason: str = ""
    #: the shapes in the graph's metadata are enforced by the module (torch.export guards them)
    trusted_shapes: bool = False


class BnfoldTracer(fx.Tracer):
    """symbolic_trace's tracer, plus: subclasses of torch layers that compute the plain function are leaves.

    The default tracer keeps only modules defined in ``torch.nn`` as leaves, so it traces into a
    user's ``class FrozenBN(nn.BatchNorm2d)`` — and fails on its ``if input.dim() != 4``. A subclass
    that overrides ``forward`` is still traced through, which is how a BatchNormAct2d's
    ``F.batch_norm`` call becomes visible to the functional rule.
    """

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if module_kind(module) is not None and behaves_like_torch(module):
            return True
        return super().is_leaf_module(module, module_qualified_name)


def as_args(example_inputs: Any) -> tuple[Any, ...] | None:
    """Example inputs as a positional tuple: a lone tensor becomes a 1-tuple; None stays None."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    kind = type(example_inputs).__name__
    raise BnfoldError(f"example_inputs must be a tensor or a tuple of positional inputs, not {kind}")


def is_exported_module(model: nn.Module) -> bool:
    """Whether ``model`` came from ``ExportedProgram.module()`` (its train/eval state is baked in)."""
    try:
        from torch.export._unlift import _StatefulGraphModule
    except ImportError:  # pragma: no cover - torch versions without it
        return False
    return isinstance(model, _StatefulGraphModule)


def trace(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None,
    *,
    tracer: str = "auto",
    dynamic_shapes: Any = None,
) -> Traced:
    """A GraphModule computing ``model``'s function (``model`` itself is neither traced in place nor changed).

    ``tracer``: ``auto`` (symbolic_trace, then torch.export when that fails and example inputs are
    given), ``fx`` or ``export``. A GraphModule is used as it is. Raises :class:`BnfoldError` with
    both tracers' reasons when neither can capture the model.
    """
    if tracer not in TRACERS:
        raise BnfoldError(f"unknown tracer {tracer!r}; choose from {', '.join(TRACERS)}")
    if isinstance(model, fx.GraphModule):
        exported = is_exported_module(model)
        graph_module = _plain_graph_module(model) if exported else model
        if example_inputs is not None and not _has_shapes(graph_module):
            propagate_shapes(graph_module, example_inputs)
        return Traced(graph_module, GRAPH_MODULE, trusted_shapes=exported)
    symbolic_error = ""
    if tracer in ("auto", "fx"):
        try:
            graph_module = _symbolic_trace(model)
            if example_inputs is not None:
                propagate_shapes(graph_module, example_inputs)
            return Traced(graph_module, SYMBOLIC_TRACE)
        except Exception as error:  # tracing runs arbitrary user code; any failure means "cannot trace"
            symbolic_error = first_line(error)
            logger.debug("symbolic_trace failed", exc_info=True)
            if tracer == "fx":
                raise BnfoldError(
                    f"torch.fx.symbolic_trace cannot trace the model: {symbolic_error}"
                ) from None
            if example_inputs is None:
                raise BnfoldError(
                    f"torch.fx.symbolic_trace cannot trace the model ({symbolic_error}); pass "
                    "example_inputs to fall back to torch.export"
                ) from None
    if example_inputs is None:
        raise BnfoldError("tracing with torch.export needs example_inputs")
    torch_messages = io.StringIO()
    try:
        # torch.export prints a partial graph to stderr when it fails; the error says what matters.
        with contextlib.redirect_stderr(torch_messages):
            exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # same: export failures come in many exception types
        logger.debug("torch.export failed:\n%s", torch_messages.getvalue(), exc_info=True)
        prefix = f"torch.fx.symbolic_trace: {symbolic_error}; " if symbolic_error else ""
        raise BnfoldError(
            f"cannot trace the model ({prefix}torch.export: {first_line(error)}); data-dependent "
            "control flow must use torch.cond"
        ) from None
    graph_module = _plain_graph_module(exported.module())
    return Traced(graph_module, TORCH_EXPORT, fallback_reason=symbolic_error, trusted_shapes=True)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    graph = BnfoldTracer().trace(model)
    name = type(model).__name__
    return fx.GraphModule(model, graph, name)


def _has_shapes(graph_module: fx.GraphModule) -> bool:
    return any("val" in node.meta or "tensor_meta" in node.meta for node in graph_module.graph.nodes)


def _plain_graph_module(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule over the same graph (``ExportedProgram.module()`` refuses ``eval()``).

    The graph keeps its pytree code generator and guards, so inputs are checked as before.
    """
    plain = fx.GraphModule(graph_module, graph_module.graph, type(graph_module).__name__)
    plain.train(False)
    return plain


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Record every node's output shape (``node.meta['tensor_meta']``) by running the graph once.

    Buffers are restored afterwards: a BN left in training mode would otherwise update its running
    statistics (and ``inplace=True`` shares them with the user's model).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    with preserved_buffers(graph_module), torch.no_grad():
        ShapeProp(graph_module).propagate(*input_copies(example_inputs))  # a module may write into them


def input_copies(inputs: Any) -> Any:
    """``inputs`` (any nesting of tuples, lists and dicts) with every tensor cloned: running a module
    that writes into its inputs (``x.mul_(3)``) must not change the caller's tensors."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, inputs)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run code that may update buffers in place (running statistics) and put their values back."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers() if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def describe_inputs(example_inputs: Sequence[Any] | None) -> dict[str, list[int]]:
    """``{"input_0": [2, 3, 16, 16], ...}`` for the tensors among the example inputs."""
    if not example_inputs:
        return {}
    return {
        f"input_{index}": list(value.shape)
        for index, value in enumerate(example_inputs)
        if isinstance(value, torch.Tensor)
    }
