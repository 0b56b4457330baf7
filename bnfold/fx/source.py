"""Where a PyTorch model comes from on the command line: a saved ``.pt2`` program or a factory function.

``model.pt2`` is read with ``torch.export.load`` (a zip of a serialized graph and weights) — but only
when the caller says the file is trusted (``trust_code=True``, the CLI's ``--trust-pt2``):
``torch.export.load`` unpickles parts of the archive (the saved example inputs fall back to
``weights_only=False``, weights may be marked to load with pickle, opaque constants go through
``pickle.loads``), so a crafted ``.pt2`` runs code when loaded. bnfold never calls ``torch.load`` on
``.pt``/``.pth`` files at all. ``package.module:factory`` imports the module (the user's own code, on
purpose: it runs) from the current directory first, as ``python -m`` does, and calls ``factory()``,
which returns the model or ``(model, example_inputs)``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import InputSpecError, ModelLoadError
from bnfold.fx.trace import first_line, preserved_buffers
from bnfold.sources import FACTORY_SPEC, PICKLE_SUFFIXES, is_torch_source

__all__ = ["load_torch_source", "is_torch_source"]

InputShapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None


def load_torch_source(
    spec: str, input_shapes: InputShapes = None, *, trust_code: bool = False
) -> tuple[nn.Module, tuple[Any, ...]]:
    """Load a model and example inputs from ``model.pt2`` or ``package.module:factory``.

    A ``.pt2`` is loaded only with ``trust_code=True``: loading one can run code from the file.

    ``input_shapes`` gives the example inputs' shapes by forward-argument name (``{"x": [1, 3, 224,
    224]}``, what ``--input-shape`` parses to) or by position; inputs are float32 (or the model's
    parameter dtype) drawn from a seeded generator. Without shapes, a ``.pt2`` uses the example
    inputs saved with it and a factory must return ``(model, example_inputs)``. Every failure is a
    :class:`BnfoldError` with a one-line message.
    """
    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec), input_shapes, trust_code)
    if spec.endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{spec}: bnfold does not unpickle torch.save files (loading them runs arbitrary code); "
            "save with torch.export.save(program, 'model.pt2') or give package.module:factory"
        )
    if FACTORY_SPEC.match(spec):
        return _load_factory(spec, input_shapes)
    raise ModelLoadError(
        f"{spec}: expected a torch.export file (model.pt2) or a factory spec (package.module:function)"
    )


def _load_pt2(path: Path, input_shapes: InputShapes, trust_code: bool) -> tuple[nn.Module, tuple[Any, ...]]:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a .pt2 file")
    if not trust_code:
        raise ModelLoadError(
            f"{path}: loading a .pt2 file can run code from it (torch.export.load unpickles parts of "
            "the archive); pass --trust-pt2 (trust_code=True) if you trust this file"
        )
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a torch.export archive (not a zip file)")
    try:
        with _torch_quiet():
            program = torch.export.load(str(path))
            module = program.module()
    except Exception as error:  # deserialization raises many types; the user needs one line
        raise ModelLoadError(f"{path}: cannot load the exported program ({first_line(error)})") from None
    names = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    dtypes = [getattr(placeholders[name].meta.get("val"), "dtype", torch.float32) for name in names]
    if input_shapes:
        inputs = _make_inputs(names, dtypes, input_shapes, str(path))
        # An exported program is specialized to its export shapes unless exported with dynamic
        # shapes: a mismatch fails in its guards, which is the user's input, not a bnfold bug.
        _check_runs(
            module,
            inputs,
            f"{path}: the program does not run on {{input_shapes}}",
            "export it with dynamic_shapes, or drop {input_shapes}",
        )
        return module, inputs
    saved = program.example_inputs
    if saved is None:
        raise InputSpecError(
            f"{path}: no example inputs saved with the program; give {{input_shapes}} for {names}",
            parameters=("input_shapes",),
        )
    args, kwargs = saved
    if kwargs:
        raise InputSpecError(
            f"{path}: keyword example inputs are not supported; give {{input_shapes}}",
            parameters=("input_shapes",),
        )
    _check_runs(
        module,
        tuple(args),
        f"{path}: the program does not run on its saved example inputs",
        "give {input_shapes}",
    )
    return module, tuple(args)


def _load_factory(spec: str, input_shapes: InputShapes) -> tuple[nn.Module, tuple[Any, ...]]:
    module_name, _, attribute = spec.partition(":")
    try:
        with _current_directory_importable():
            python_module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"{spec}: cannot import {module_name} ({first_line(error)})") from None
    except Exception as error:  # importing user code may raise anything
        raise ModelLoadError(f"{spec}: importing {module_name} failed ({first_line(error)})") from None
    factory: Any = python_module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(f"{spec}: {module_name} has no attribute {attribute}")
    if not callable(factory):
        raise ModelLoadError(f"{spec}: {attribute} is not callable")
    try:
        made = factory()
    except Exception as error:
        raise ModelLoadError(f"{spec}: {attribute}() raised {first_line(error)}") from None
    example: tuple[Any, ...] | None = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, given = made
        example = (given,) if isinstance(given, torch.Tensor) else tuple(given)
    if not isinstance(made, nn.Module):
        raise ModelLoadError(
            f"{spec}: {attribute}() returned {type(made).__name__}; expected a torch.nn.Module "
            "or (module, example_inputs)"
        )
    if input_shapes:
        names = _forward_inputs(made)
        parameter = next((p for p in made.parameters() if p.is_floating_point()), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        inputs = _make_inputs(names, [dtype] * len(names), input_shapes, spec)
        _check_runs(made, inputs, f"{spec}: the model does not run on {{input_shapes}}", "check the shapes")
        return made, inputs
    if example is None:
        raise InputSpecError(
            f"{spec}: give {{input_shapes}} for {_forward_inputs(made)} (or return (model, example_inputs))",
            parameters=("input_shapes",),
        )
    _check_runs(
        made,
        example,
        f"{spec}: the model does not run on the example inputs {attribute}() returned",
        "return inputs the model accepts, or give {input_shapes}",
    )
    return made, example


def _check_runs(module: nn.Module, inputs: tuple[Any, ...], failure: str, advice: str) -> None:
    """Run ``module`` once on ``inputs`` (buffers kept as they were), so that inputs that do not fit
    are reported as what they are, before tracing turns them into a tracing failure."""
    try:
        with preserved_buffers(module), torch.no_grad(), _torch_quiet():
            module(*inputs)
    except Exception as error:  # a forward pass can raise anything
        shapes = [list(value.shape) for value in inputs if isinstance(value, torch.Tensor)]
        raise InputSpecError(
            f"{failure} {shapes} ({first_line(error)}); {advice}", parameters=("input_shapes",)
        ) from None


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """Import with the current directory first on ``sys.path``, as ``python -m`` does (a console
    script's ``sys.path`` starts with the script's folder instead)."""
    current = os.getcwd()
    added = current not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, current)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(current)


@contextlib.contextmanager
def _torch_quiet() -> Iterator[None]:
    """Keep what torch prints while it fails (partial graphs, logged tracebacks, warnings) off the
    terminal: the one-line error says what matters, and BNFOLD_DEBUG=1 shows the rest."""
    if os.environ.get("BNFOLD_DEBUG"):
        yield
        return
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def _forward_inputs(module: nn.Module) -> list[str]:
    """Names of ``forward``'s positional parameters (the model's inputs)."""
    parameters = inspect.signature(module.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [parameter.name for parameter in parameters if parameter.kind in kinds]


def _make_inputs(
    names: list[str], dtypes: list[torch.dtype], input_shapes: InputShapes, source: str
) -> tuple[torch.Tensor, ...]:
    if isinstance(input_shapes, Mapping):
        unknown = sorted(set(input_shapes) - set(names))
        if unknown:
            raise InputSpecError(
                f"{source}: {{input_shapes}} names unknown input(s) {unknown}; inputs: {names}",
                parameters=("input_shapes",),
            )
        missing = [name for name in names if name not in input_shapes]
        if missing:
            raise InputSpecError(
                f"{source}: give {{input_shapes}} for {missing}", parameters=("input_shapes",)
            )
        shapes = [list(input_shapes[name]) for name in names]
    else:
        shapes = [list(shape) for shape in input_shapes or ()]
        if len(shapes) != len(names):
            raise InputSpecError(
                f"{source}: {len(shapes)} input shapes given, the model takes {names}",
                parameters=("input_shapes",),
            )
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 4, shape, generator=generator).to(dtype))
    return tuple(inputs)
