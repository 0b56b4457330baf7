"""The inputs a verification runs: random feeds drawn for a model's declared inputs, or given data.

Random feeds are seeded per input (``seed + position``, so any failure reproduces); every dynamic
dimension gets a second size for the second run (:func:`second_shapes`), and a one-element boolean
input (a condition: each value selects a branch) is True in one run and False in the other.
Given data (a dict, an ``.npz`` or, for one input, an ``.npy``) is checked against the model's
declared names, dtypes and fixed dimensions. Sizes are checked against the memory available before
anything is allocated (:mod:`bnfold.input_limits`). Everything here reads input declarations from
an ONNX Runtime session (``session.get_inputs()``); running the models is :mod:`bnfold.verify`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.errors import InputSpecError
from bnfold.input_limits import check_random_input, read_inputs_file

__all__ = [
    "InputCase",
    "ORT_INPUT_TYPES",
    "input_dtype",
    "random_inputs",
    "second_shapes",
    "larger_default_shapes",
    "DEFAULT_SIZE_LADDER",
    "given_inputs",
    "read_input_file",
    "parse_input_shapes",
    "shapes_text",
]

ORT_INPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
"""ONNX Runtime's input type names -> the numpy dtypes bnfold can draw or accept for them."""


@dataclass
class InputCase:
    """One run: the feeds, the seed they came from (None for given data), and the original's outputs."""

    feeds: dict[str, np.ndarray]
    seed: int | None
    expected: list[np.ndarray] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "input_shapes": {name: list(value.shape) for name, value in self.feeds.items()},
        }


def input_dtype(meta: Any) -> np.dtype:
    """The dtype of the input ``meta`` (an ONNX Runtime ``NodeArg``), or an error saying to pass data."""
    if meta.type not in ORT_INPUT_TYPES:
        raise InputSpecError(
            f"input {meta.name!r} has type {meta.type}, which bnfold cannot generate; "
            "pass real data in {inputs}",
            parameters=("inputs",),
        )
    return np.dtype(ORT_INPUT_TYPES[meta.type])


def random_inputs(
    session: Any, shapes: Mapping[str, list[int]], seed: int, *, boolean: bool | None = None
) -> dict[str, np.ndarray]:
    """Random feeds for every input of ``session``: the sizes ``shapes`` gives (checked against the
    declared ones), else each dynamic dimension at 1. A one-element boolean input is ``boolean`` when
    given (a condition: each value selects a branch), random otherwise."""
    metas = session.get_inputs()
    unknown = set(shapes) - {meta.name for meta in metas}
    if unknown:
        names = ", ".join(meta.name for meta in metas)
        raise InputSpecError(
            f"{{input_shapes}} names unknown input(s) {sorted(unknown)}; the model has: {names}",
            parameters=("input_shapes",),
        )
    feeds = {}
    for position, meta in enumerate(metas):
        declared = list(meta.shape)
        if meta.name in shapes:
            shape = list(shapes[meta.name])
            if len(shape) != len(declared):
                raise InputSpecError(
                    f"{{input_shapes}} {meta.name}: rank {len(shape)} given, the model declares {declared}",
                    parameters=("input_shapes",),
                )
            for given, fixed in zip(shape, declared, strict=True):
                if isinstance(fixed, int) and fixed != given:
                    given_text = ",".join(map(str, shape))
                    raise InputSpecError(
                        f"{{input_shapes}} {meta.name}={given_text}: the model fixes it to {declared}",
                        parameters=("input_shapes",),
                    )
        else:
            shape = [dim if isinstance(dim, int) and dim >= 0 else 1 for dim in declared]
        dtype = input_dtype(meta)
        check_random_input(meta.name, shape, dtype, fixed=all(isinstance(dim, int) for dim in declared))
        generator = np.random.default_rng(seed + position)
        if dtype.kind == "f":
            value = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            value = generator.integers(0, 2, size=shape).astype(np.bool_)
            if boolean is not None and value.size == 1:
                value = np.full(shape, boolean)
        else:
            value = generator.integers(0, 4, size=shape).astype(dtype)
        feeds[meta.name] = value
    return feeds


DEFAULT_SIZE_LADDER = (8, 32, 224)
"""Sizes tried for dynamic dimensions (but the first axis) when the original rejects them at 1."""


def larger_default_shapes(
    metas: list[Any], given: Mapping[str, list[int]], size: int
) -> dict[str, list[int]]:
    """Shapes for the inputs the user did not size, with every dynamic dimension at ``size`` except
    the first axis (a batch: 1); {} when no input has such a dimension past the first axis."""
    shapes: dict[str, list[int]] = dict(given)
    grown = False
    for meta in metas:
        if meta.name in given:
            continue
        dims = []
        for axis, declared in enumerate(meta.shape):
            if isinstance(declared, int) and declared >= 0:
                dims.append(declared)
            elif axis == 0:
                dims.append(1)
            else:
                dims.append(size)
                grown = True
        shapes[meta.name] = dims
    return shapes if grown else {}


def second_shapes(
    metas: list[Any], primary: Mapping[str, list[int]], *, grow: bool = False
) -> dict[str, list[int]]:
    """Every dynamic dimension at a second size: 3 where the first run had 1, else 1 (a fold that
    broadcasts or reshapes with a baked-in size shows at one of the two); with ``grow`` (the model
    rejects small sizes), one more than the first run's instead of 1."""
    shapes = {}
    for meta in metas:
        shapes[meta.name] = [
            size
            if isinstance(declared, int) and declared >= 0
            else (3 if size == 1 else (size + 1 if grow else 1))
            for declared, size in zip(meta.shape, primary[meta.name], strict=True)
        ]
    return shapes


def given_inputs(session: Any, inputs: Mapping[str, np.ndarray] | str | os.PathLike) -> dict[str, np.ndarray]:
    """The user's data (a dict or a file path) as feeds, checked against ``session``'s inputs:
    the same names, the declared dtypes, the declared rank and fixed dimensions."""
    if not isinstance(inputs, Mapping):
        inputs = read_input_file(inputs, [meta.name for meta in session.get_inputs()])
    metas = {meta.name: meta for meta in session.get_inputs()}
    missing = sorted(set(metas) - set(inputs))
    extra = sorted(set(inputs) - set(metas))
    if missing or extra:
        raise InputSpecError(
            f"{{inputs}} do not match the model's inputs: missing {missing}, unexpected {extra}",
            parameters=("inputs",),
        )
    feeds = {}
    for name, meta in metas.items():
        value = np.asarray(inputs[name])
        dtype = input_dtype(meta)
        if value.dtype != dtype:
            raise InputSpecError(
                f"{{inputs}} {name}: dtype {value.dtype.name}, the model expects {dtype.name}",
                parameters=("inputs",),
            )
        declared = list(meta.shape)
        if len(declared) != value.ndim or any(
            isinstance(fixed, int) and fixed != given
            for fixed, given in zip(declared, value.shape, strict=True)
        ):
            raise InputSpecError(
                f"{{inputs}} {name}: shape {list(value.shape)}, the model declares {declared}",
                parameters=("inputs",),
            )
        feeds[name] = value
    return feeds


def read_input_file(path: str | os.PathLike, input_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays by input name from an ``.npz`` (one array per input name) or, for a model with one
    input, an ``.npy`` (that input's array). Never unpickles; every entry's size is checked against
    its header and the memory available before it is read (:mod:`bnfold.input_limits`)."""
    return read_inputs_file(path, input_names)


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["x=1,3,224,224", ...]`` -> ``{"x": [1, 3, 224, 224]}``, with a clear error for bad text."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, separator, dims = spec.rpartition("=")
        if not separator or not name:
            raise InputSpecError(f"--input-shape {spec!r}: expected NAME=D1,D2,... e.g. input=1,3,224,224")
        try:
            shape = [int(dim) for dim in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise InputSpecError(f"--input-shape {spec!r}: dimensions must be integers") from None
        if any(dim <= 0 for dim in shape):
            raise InputSpecError(
                f"--input-shape {spec!r}: dimensions must be positive (an empty tensor compares nothing)"
            )
        if name in shapes:
            raise InputSpecError(f"--input-shape {name}: given twice")
        shapes[name] = shape
    return shapes


def shapes_text(shapes: Mapping[str, list[int]]) -> str:
    """``{"x": [1, 3]}`` -> ``x=1x3`` (a scalar shows as ``scalar``), for messages."""
    return ", ".join(f"{name}={'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items())
