"""TensorProto helpers every part of :mod:`bnfold.onnx.io` shares: the size limits, the external-data
location vocabulary (absolute paths, non-UTF-8 paths, weight stores' names), making a tensor
a reference to bytes elsewhere, walking every tensor of a model, and copying a tensor's header."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

EXTERNAL_DATA_THRESHOLD = 1024  # bytes; smaller tensors stay inside the .onnx file
EXTERNAL_DATA_ALIGNMENT = 4096  # lets ONNX Runtime memory-map tensors


IDENTITY_KEY = "bnfold-source-file"
STORE_KEY = "bnfold-weight-store"  # the WeightStore a lazily loaded model's new weights go to
PATH_BYTES = "\0bnfold-path/"
"""The start of the location of a file whose absolute path is not UTF-8 (protobuf strings must be),
followed by the path's bytes in hexadecimal; the NUL byte keeps every other reader from opening it."""


def location_text(path: str) -> str:
    """``path`` as protobuf can hold it: itself, or (not UTF-8) its bytes behind ``PATH_BYTES``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return PATH_BYTES + os.fsencode(path).hex()
    return path


def location_path(text: str) -> str:
    """The inverse of :func:`location_text`."""
    if text.startswith(PATH_BYTES):
        return os.fsdecode(bytes.fromhex(text[len(PATH_BYTES) :]))
    return text


def point_at(
    tensor: TensorProto,
    location: str,
    offset: int,
    length: int,
    identity: str | None = None,
    store_key: int | None = None,
) -> None:
    """Make ``tensor`` an external-data reference to ``length`` bytes at ``offset`` of ``location``.

    ``identity`` (:func:`file_identity` of a source file) lets every later read check that the
    file is still the one that was loaded (see :func:`on_disk`). ``store_key`` names the weight
    store that a fold of the model keeps new weights in (see :func:`bnfold.onnx.io.store.store_of`).
    Both are bnfold's own keys, never written to a saved model.
    """
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", location_text(location)), ("offset", str(offset)), ("length", str(length))]
    if identity is not None:
        entries.append((IDENTITY_KEY, identity))
    if store_key is not None:
        entries.append((STORE_KEY, str(store_key)))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def all_tensors(graph: GraphProto) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is_initializer) for every tensor of ``graph`` and its subgraphs."""
    for tensor in graph.initializer:
        yield tensor, True
    yield from node_tensors(graph.node)


def node_tensors(nodes) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, False) for every tensor attribute of ``nodes`` (Constant values included), and the
    tensors of their subgraphs."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t, False
            elif attribute.type == AttributeProto.TENSORS:
                for tensor in attribute.tensors:
                    yield tensor, False
            elif attribute.type == AttributeProto.GRAPH:
                yield from all_tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from all_tensors(subgraph)


def model_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    """Every tensor of the model: its graphs' (subgraphs included) and those inside its model-local
    functions (``model.functions``: Constant nodes and subgraphs of their bodies)."""
    yield from all_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)


def is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return field.label == field.LABEL_REPEATED if repeated is None else repeated  # older protobuf


def copy_field(target, field, value) -> None:
    if is_repeated(field):
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


_DATA_FIELDS = ("raw_data", "external_data", "data_location")


def copy_header(tensor: TensorProto, target: TensorProto) -> TensorProto:
    """Copy every field of ``tensor`` but its raw_data and external-data location into ``target``."""
    for field in TensorProto.DESCRIPTOR.fields:
        if field.name in _DATA_FIELDS:
            continue
        if is_repeated(field):
            values = getattr(tensor, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif tensor.HasField(field.name):
            setattr(target, field.name, getattr(tensor, field.name))
    return target


# Whole-byte types whose raw_data is exactly count * item size (not the packed 4-bit ones).
_PLAIN_TYPES = frozenset(range(1, 14)) - {TensorProto.STRING} | {16, 17, 18, 19, 20}


def plain_item_size(data_type: int) -> int | None:
    if data_type not in _PLAIN_TYPES:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def memory_location(tensor: TensorProto) -> str | None:
    """The location of a tensor whose value is in a weight store's memory, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value if entry.value.startswith(MEMORY_LOCATION) else None
    return None


MEMORY_LOCATION = "\0bnfold-memory/"
"""The start of the external-data location of a tensor whose value is in a weight store's memory (see
:mod:`bnfold.onnx.io`): a NUL byte, which no file name can hold, then the store's key and a number."""
