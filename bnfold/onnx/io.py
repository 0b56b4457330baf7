"""Loading ONNX files with clear errors, and writing them atomically (external data included).

Loading: every failure is a :class:`ModelLoadError` whose message names the file and the problem.
With ``lazy=True`` the weights stay on disk: the loader reads the protobuf structure and leaves each
large initializer of the main graph as a reference (absolute path, offset, length) to its bytes in
the source file — the ``.onnx`` itself for inline weights, found by walking the protobuf wire format,
or the external data file. :func:`read_tensor` maps one such tensor (read-only, not copied) when a
fold needs it; new values stay in memory up to a budget (``bnfold.onnx.graph.NEW_WEIGHTS_MEMORY_BUDGET``)
and go to a spill file beyond it (:func:`store_tensor`), and :func:`save_model` streams every
referenced range into the output (``os.copy_file_range``), so no weight is held in memory that a
fold does not change. The structure is checked with ``onnx.checker`` on a copy whose large tensors
are one-element stand-ins, with the sizes checked here; the weights are never serialized to check.

Where a lazily loaded model's main-graph initializer keeps its bytes, told by its external-data
``location`` (``data_location`` is EXTERNAL in all three; small tensors keep raw_data):

- an absolute path (with ``offset`` and ``length``): a range of the source ``.onnx`` file, of its
  external data file, or of the spill file — mapped read-only by :func:`read_tensor`, copied into
  the output by the kernel;
- ``MEMORY_LOCATION`` followed by a number (``"\0bnfold-memory/12"``; the NUL byte makes it a
  name no file can have, so no file is ever opened by it, and ONNX tools refuse it rather than read
  something else): a new weight a fold stored as a numpy array in this process's in-memory store,
  never copied into the protobuf. :func:`read_tensor` returns that array (read-only) and
  :func:`save_model` writes it from the array's buffer, inline or as external data. The arrays live
  as long as the process, like the spill file (a fold keeps at most the budget's worth there).

Such references are only understood by this module: ``onnx.save`` of a lazily loaded model would not
write its weights. Models that were not loaded lazily (``fold_onnx(path)``, ``fold_onnx(ModelProto)``)
never get them: their new weights are plain raw_data.

Saving: the model is written to a temporary file in the target directory and renamed over the
target only once complete, so a reader (or an interrupted run) sees the old file or the new one,
never half of one. The protobuf is written piece by piece (the graph's initializers one at a time),
never serialized whole. Models that used external data are written with external data; the model
and its data file are both written to temporary files first and then renamed one after the other
with SIGINT/SIGTERM held back, so an interrupt never leaves the old model naming the new data.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, numpy_helper
from onnx.external_data_helper import (
    uses_external_data,
)

from bnfold.errors import BnfoldError, InternalError, ModelLoadError, OutputError
from bnfold.onnx.outputs import (
    check_output_path,
    commit,
    commit_pair,
    output_target,
    signals_held,
    write_all,
    write_atomically,
    write_error,
)

__all__ = [
    "LoadedModel",
    "load_model",
    "save_model",
    "check_output_path",
    "check_folded",
    "write_atomically",
    "exceeds_protobuf_limit",
    "has_data_on_disk",
    "is_lazy",
    "read_tensor",
    "store_tensor",
]

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1024  # bytes; smaller tensors stay inside the .onnx file
EXTERNAL_DATA_ALIGNMENT = 4096  # lets ONNX Runtime memory-map tensors


@dataclass
class LoadedModel:
    model: ModelProto
    path: Path
    used_external_data: bool
    # The external data files the model was read from (resolved), so callers can refuse to write
    # over them.
    external_files: tuple[Path, ...] = ()
    # Whether large initializers were left on disk (load_model(..., lazy=True)); see has_data_on_disk.
    lazy: bool = False


def load_model(path: str | os.PathLike, *, check: bool = True, lazy: bool = False) -> LoadedModel:
    """Read an ONNX file; raise :class:`ModelLoadError` with a one-line reason when it is not one.

    ``lazy=True`` leaves the large initializers of the main graph on disk, as external-data
    references with absolute paths into the source files (see the module docstring): the model is
    then only good for bnfold's own fold, :func:`save_model` and verifier, which read them.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    model, lazy_ranges = (_scan_file(path) if lazy else None) or (_parse_file(path), [])
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, opset or IR version)")
    field = _non_utf8_field(model)
    if field is not None:
        raise ModelLoadError(f"{path}: invalid ONNX model (text in {field} is not UTF-8)")
    used_external_data = _uses_external_data(model)
    external_files: tuple[Path, ...] = ()
    if used_external_data:
        try:
            external_files = _external_files(model, path.parent)
            _resolve_external_data(model, path.parent, keep_on_disk=lazy)
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise ModelLoadError(f"{path}: cannot load its external data ({_one_line(error)})") from None
    if check:
        _check(model, path, lazy_ranges)
    source = str(path.resolve())
    identity = _file_identity(source) if lazy_ranges else None
    for tensor, offset, length in lazy_ranges:
        _point_at(tensor, source, offset, length, identity)
    return LoadedModel(model, path, used_external_data, external_files, lazy=lazy)


def _parse_file(path: Path) -> ModelProto:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read ({error.strerror})") from error
    if not data:
        raise ModelLoadError(f"{path}: file is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf parse failed: {error})") from None
    return model


# -- the protobuf wire format, just enough to find where each initializer's raw_data lies ----------
class _WireError(Exception):
    """The bytes are not the simple protobuf this scanner reads: parse the whole file instead."""


def _varint(buffer, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise _WireError
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field, start of its value, end) for each field in ``buffer[start:end]``."""
    position = start
    while position < end:
        field_start = position
        tag, position = _varint(buffer, position, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value_start = position
            _, position = _varint(buffer, position, end)
        elif wire_type == 2:
            length, position = _varint(buffer, position, end)
            value_start = position
            position += length
        elif wire_type in (1, 5):
            value_start = position
            position += 8 if wire_type == 1 else 4
        else:  # groups: not in ONNX
            raise _WireError
        if number == 0 or position > end:
            raise _WireError
        yield number, field_start, value_start, position


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, length: int) -> bytes:
    """The tag and length that precede a length-delimited field of ``length`` bytes."""
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def _split_after(serialized: bytes, number: int) -> int:
    """The offset of the first field numbered above ``number`` (protobuf writes fields in order)."""
    for field_number, field_start, _, _ in _fields(serialized, 0, len(serialized)):
        if field_number > number:
            return field_start
    return len(serialized)


_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DATA_TYPE, _TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION = 2, 9, 14


def _scan_file(path: Path) -> tuple[ModelProto, list[tuple[TensorProto, int, int]]] | None:
    """The model without the raw_data of its large main-graph initializers, and where those lie.

    None when the file has no such tensors or is not the plain protobuf this walk reads (then the
    whole file is parsed, which also gives the right error for a broken one).
    """
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _scan(buffer)
    except (OSError, ValueError, _WireError, DecodeError, RuntimeError):
        return None


def _scan(buffer) -> tuple[ModelProto, list[tuple[TensorProto, int, int]]] | None:
    top: list[bytes] = []
    graph_range = None
    for number, field_start, value_start, end in _fields(buffer, 0, len(buffer)):
        if number == _MODEL_GRAPH:
            if graph_range is not None or buffer[field_start] != (_MODEL_GRAPH << 3 | 2):
                raise _WireError
            graph_range = (value_start, end)
        else:
            top.append(buffer[field_start:end])
    if graph_range is None:
        return None
    graph_parts: list[bytes] = []
    initializers: list[bytes] = []
    ranges: list[tuple[int, int, int]] = []  # (initializer position, offset, length)
    for number, field_start, value_start, end in _fields(buffer, *graph_range):
        if number != _GRAPH_INITIALIZER or buffer[field_start] != (_GRAPH_INITIALIZER << 3 | 2):
            graph_parts.append(buffer[field_start:end])
            continue
        raw, located, count, data_type = None, False, 0, 0
        for tensor_number, tensor_field, tensor_value, tensor_end in _fields(buffer, value_start, end):
            if tensor_number == _TENSOR_RAW_DATA:
                count += 1
                raw = (tensor_field, tensor_value, tensor_end)
            elif tensor_number == _TENSOR_DATA_TYPE and buffer[tensor_field] == _TENSOR_DATA_TYPE << 3:
                data_type = _varint(buffer, tensor_value, tensor_end)[0]
            located |= tensor_number == _TENSOR_DATA_LOCATION
        plain = _item_size(data_type) is not None
        if count == 1 and plain and not located and raw[2] - raw[1] >= EXTERNAL_DATA_THRESHOLD:
            ranges.append((len(initializers), raw[1], raw[2] - raw[1]))
            initializers.append(buffer[value_start : raw[0]] + buffer[raw[2] : end])
        else:
            initializers.append(buffer[value_start:end])
    if not ranges:
        return None
    graph = b"".join(graph_parts) + b"".join(
        _length_delimited(_GRAPH_INITIALIZER, len(tensor)) + tensor for tensor in initializers
    )
    model = ModelProto()
    model.ParseFromString(b"".join(top) + _length_delimited(_MODEL_GRAPH, len(graph)) + graph)
    return model, [(model.graph.initializer[index], offset, length) for index, offset, length in ranges]


def _point_at(
    tensor: TensorProto, location: str, offset: int, length: int, identity: str | None = None
) -> None:
    """Make ``tensor`` an external-data reference to ``length`` bytes at ``offset`` of ``location``.

    ``identity`` (:func:`_file_identity` of a source file) lets every later read check that the
    file is still the one that was loaded (see :func:`_on_disk`).
    """
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", _location_text(location)), ("offset", str(offset)), ("length", str(length))]
    if identity is not None:
        entries.append((_IDENTITY_KEY, identity))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


_IDENTITY_KEY = "bnfold-source-file"
_PATH_BYTES = "\0bnfold-path/"
"""The start of the location of a file whose absolute path is not UTF-8 (protobuf strings must be),
followed by the path's bytes in hexadecimal; the NUL byte keeps every other reader from opening it."""


def _location_text(path: str) -> str:
    """``path`` as protobuf can hold it: itself, or (not UTF-8) its bytes behind ``_PATH_BYTES``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _PATH_BYTES + os.fsencode(path).hex()
    return path


def _location_path(text: str) -> str:
    """The inverse of :func:`_location_text`."""
    if text.startswith(_PATH_BYTES):
        return os.fsdecode(bytes.fromhex(text[len(_PATH_BYTES) :]))
    return text


def _file_identity(path: str | os.PathLike) -> str:
    """Which file ``path`` is now, and which version of it: device, inode, size, modification time."""
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_external_data(model: ModelProto, directory: Path, *, keep_on_disk: bool) -> None:
    """Check every external tensor's file and range (model-local functions included); with
    ``keep_on_disk`` keep the large main-graph initializers on disk (absolute locations), and load
    the rest (small ones, subgraph initializers, Constant values) into raw_data, so that no
    reference relative to the source's folder survives into an output written elsewhere."""
    root = directory.resolve()
    initializers = list(model.graph.initializer)  # alive, so that their ids stay theirs
    main = {id(tensor) for tensor in initializers}
    for tensor, _ in list(_model_tensors(model)):
        if not uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if "\0" in location:
            raise ValueError(f"tensor `{tensor.name}`: location {location!r} contains a NUL byte")
        target = (directory / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(root):
            raise ValueError(f"tensor `{tensor.name}`: location {location!r} is not inside {directory}")
        if not target.is_file():
            raise ValueError(f"tensor `{tensor.name}`: {location} is not a regular file")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise ValueError(f"tensor `{tensor.name}`: offset or length is not a number") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(
                f"tensor `{tensor.name}`: bytes {offset}..{offset + length} lie outside {location} "
                f"({size} bytes)"
            )
        large = length >= EXTERNAL_DATA_THRESHOLD and _item_size(tensor.data_type)
        if keep_on_disk and id(tensor) in main and large:
            _point_at(tensor, str(target), offset, length, _file_identity(target))
        else:  # read here (onnx's reader cannot open a folder whose name is not UTF-8)
            with open(target, "rb") as handle:
                tensor.raw_data = os.pread(handle.fileno(), length, offset)
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def _external_files(model: ModelProto, directory: Path) -> tuple[Path, ...]:
    files = set()
    for tensor, _ in _model_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and uses_external_data(tensor) and "\0" not in entry.value:
                files.add((directory / entry.value).resolve())
    return tuple(sorted(files))


def _non_utf8_field(message) -> str | None:
    """The path of the first string field whose bytes are not UTF-8, or None.

    ONNX strings are UTF-8 and the checker does not look; the protobuf runtime hands such a field
    back as bytes, on which names, reports and ONNX Runtime's Python binding all fail. Bytes fields
    (tensor data, string attributes) are not read, so no weights are copied.
    """
    for field in message.DESCRIPTOR.fields:
        repeated = _is_repeated(field)
        if field.type == field.TYPE_STRING:
            value = getattr(message, field.name)
            if any(isinstance(item, bytes) for item in (value if repeated else (value,))):
                return field.name
        elif field.type == field.TYPE_MESSAGE:
            if repeated:
                children = getattr(message, field.name)
            elif message.HasField(field.name):
                children = (getattr(message, field.name),)
            else:
                continue
            for child in children:
                found = _non_utf8_field(child)
                if found is not None:
                    return f"{field.name}.{found}"
    return None


def _uses_external_data(model: ModelProto) -> bool:
    # Every tensor, as onnx's loader sees them: subgraph initializers and Constant values included.
    return any(uses_external_data(tensor) for tensor, _ in _model_tensors(model))


def _all_tensors(graph: GraphProto) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is_initializer) for every tensor of ``graph`` and its subgraphs."""
    for tensor in graph.initializer:
        yield tensor, True
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[tuple[TensorProto, bool]]:
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
                yield from _all_tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_tensors(subgraph)


def _model_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    """Every tensor of the model: its graphs' (subgraphs included) and those inside its model-local
    functions (``model.functions``: Constant nodes and subgraphs of their bodies)."""
    yield from _all_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _check(model: ModelProto, path: Path, lazy_ranges=()) -> None:
    """``onnx.checker`` on a copy whose large tensors are one-element stand-ins (so the weights are
    neither copied nor serialized), with the one check that needs their bytes — raw_data at least
    as long as the shape says — done here."""
    lengths = {id(tensor): length for tensor, _, length in lazy_ranges}
    try:
        onnx.checker.check_model(_checkable_copy(model, lengths))
    except (onnx.checker.ValidationError, ValueError) as error:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_one_line(error)})") from None


def check_folded(model: ModelProto, source: str | os.PathLike) -> None:
    """Raise :class:`~bnfold.errors.InternalError` when a fold left a model the ONNX checker refuses.

    The input passed the same check when it was loaded, so such a model is bnfold's bug: it must
    be reported as one and never written (nor blamed on the input).
    """
    try:
        onnx.checker.check_model(_checkable_copy(model, {}))
    except (onnx.checker.ValidationError, ValueError) as error:
        raise InternalError(
            f"{source}: the fold made an invalid model, which was not written ({_one_line(error)})"
        ) from None


def _checkable_copy(model: ModelProto, lengths: dict[int, int]) -> ModelProto:
    copy = ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(copy, field, value)
    graph = copy.graph
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    for tensor in model.graph.initializer:
        _copy_as_stand_in(tensor, graph.initializer.add(), lengths.get(id(tensor)))
    return copy


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return field.label == field.LABEL_REPEATED if repeated is None else repeated  # older protobuf


def _copy_field(target, field, value) -> None:
    if _is_repeated(field):
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


_DATA_FIELDS = ("raw_data", "external_data", "data_location")


def _copy_header(tensor: TensorProto, target: TensorProto) -> TensorProto:
    """Copy every field of ``tensor`` but its raw_data and external-data location into ``target``."""
    for field in TensorProto.DESCRIPTOR.fields:
        if field.name in _DATA_FIELDS:
            continue
        if _is_repeated(field):
            values = getattr(tensor, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif tensor.HasField(field.name):
            setattr(target, field.name, getattr(tensor, field.name))
    return target


# Whole-byte types whose raw_data is exactly count * item size (not the packed 4-bit ones).
_PLAIN_TYPES = frozenset(range(1, 14)) - {TensorProto.STRING} | {16, 17, 18, 19, 20}


def _item_size(data_type: int) -> int | None:
    if data_type not in _PLAIN_TYPES:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _copy_as_stand_in(tensor: TensorProto, target: TensorProto, length: int | None) -> None:
    """A copy of ``tensor`` for the checker: a large one becomes one element of its type."""
    item_size = _item_size(tensor.data_type)
    external = tensor.data_location == TensorProto.EXTERNAL
    if item_size is None or not (external or length is not None or tensor.HasField("raw_data")):
        target.CopyFrom(tensor)
        return
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if length is None:
        length = int(_external_info(tensor)["length"]) if external else len(tensor.raw_data)
    if length < EXTERNAL_DATA_THRESHOLD:
        target.CopyFrom(tensor)
        return
    needed = count * item_size
    if length < needed:
        raise ValueError(
            f"TensorProto (tensor name: {tensor.name}) raw_data size ({length} bytes) is too small for "
            f"the declared shape and type ({needed} bytes required)."
        )
    _copy_header(tensor, target)
    del target.dims[:]
    target.dims.append(1)
    target.raw_data = bytes(item_size)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (the checker splits one sentence over several lines)."""
    text = " ".join(str(error).replace("==> Context:", "").split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exceeds_protobuf_limit(model: ModelProto) -> bool:
    """Whether ``model`` is too big to serialize as a single protobuf message (2 GB).

    The upb protobuf backend raises EncodeError from ``ByteSize()`` itself past the limit.
    """
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:
        return True


# -- tensors whose bytes are on disk -------------------------------------------------------------
def has_data_on_disk(model: ModelProto) -> bool:
    """Whether any main-graph initializer keeps its bytes outside the protobuf: a reference to bytes
    in a file (a lazy load, a tensor a fold spilled) or to the in-memory store — so that the model
    must be written with :func:`save_model`, not serialized."""
    return any(tensor.data_location == TensorProto.EXTERNAL for tensor in model.graph.initializer)


def is_lazy(model: ModelProto) -> bool:
    """Whether ``model`` was loaded with ``load_model(..., lazy=True)`` (a main-graph initializer
    refers to a file by absolute path, or to the in-memory store): a fold may then keep its new
    weights in the in-memory store. A model whose external data was merely not loaded is not."""
    return any(
        _on_disk(tensor) is not None or _memory_location(tensor) is not None
        for tensor in model.graph.initializer
    )


def _on_disk(tensor: TensorProto) -> tuple[str, int, int] | None:
    """(absolute path, offset, length) of a tensor whose bytes were left on disk, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = _external_info(tensor)
    location = _location_path(info.get("location", ""))
    if not os.path.isabs(location) or "length" not in info:
        return None
    identity = info.get(_IDENTITY_KEY)
    if identity is not None and _current_identity(location) != identity:
        # Saved over (an in-place save renames a new file over the source) or edited since the load:
        # the offsets would now read other bytes.
        raise ModelLoadError(
            f"{location}: changed since the model was loaded lazily (saved over?); load it again"
        )
    return location, int(info.get("offset", 0)), int(info["length"])


def _current_identity(path: str) -> str | None:
    try:
        return _file_identity(path)
    except OSError:
        return None


def _memory_location(tensor: TensorProto) -> str | None:
    """The location of a tensor whose value is in the in-memory store, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value if entry.value.startswith(MEMORY_LOCATION) else None
    return None


def _in_memory(tensor: TensorProto) -> np.ndarray | None:
    """The (read-only) array of a tensor whose value is in the in-memory store, shaped as the
    tensor says, else None.

    Raises ValueError for a reference the store does not hold (a model from another process) or a
    shape that does not hold the array's elements.
    """
    location = _memory_location(tensor)
    if location is None:
        return None
    held = _memory.get(location)
    shape = tuple(tensor.dims)
    return held if held.shape == shape else held.reshape(shape)  # a view: read-only too


def _buffer(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, not copied (one-dimensional, format ``B``)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def read_tensor(tensor: TensorProto) -> np.ndarray:
    """The value of a tensor whose bytes are on disk (absolute location), read from its file range,
    or in the in-memory store (that very array, read-only).

    Raises ValueError when the bytes do not match the type and shape.
    """
    held = _in_memory(tensor)
    if held is not None:
        return held
    where = _on_disk(tensor)
    if where is None:
        raise ValueError(f"its external data was not loaded ({_external_info(tensor).get('location')!r})")
    location, offset, length = where
    data = _mapped(location, offset, length)
    item_size = _item_size(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if item_size is not None and sys.byteorder == "little" and tensor.data_type != TensorProto.BOOL:
        if count * item_size != length:
            raise ValueError(f"{length} bytes for {count} elements of {item_size} bytes")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
    header = _copy_header(tensor, TensorProto())
    header.raw_data = bytes(data)
    return numpy_helper.to_array(header)


def _mapped(location: str, offset: int, length: int) -> memoryview:
    """``length`` bytes at ``offset`` of a file, mapped read-only rather than copied.

    The mapping covers this range only and lives as long as the returned view (and any array made
    from it), so the pages it touched stop counting towards the process's memory once the value is
    dropped — one mapping of the whole file would keep every weight ever read resident, and a
    3 GB model's fold would look like a 3 GB process. bnfold never writes to a source file (an
    in-place fold renames a new file over it; this mapping keeps the old one), and the spill file
    only grows, so a mapped range never changes under the view.
    """
    with open(location, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < offset + length:
            raise ValueError(f"{location} ends before byte {offset + length}")
        if length == 0:
            return memoryview(b"")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        mapping = mmap.mmap(handle.fileno(), offset + length - start, access=mmap.ACCESS_READ, offset=start)
    return memoryview(mapping)[offset - start :]


class _Spill:
    """A temporary file (in the system temporary directory) holding the new values of tensors that
    were on disk, so that folding a model larger than memory keeps one tensor in memory at a time.
    Removed at exit (an interrupt is held back until its removal is registered; only a SIGKILL can
    leave it behind)."""

    def __init__(self) -> None:
        with signals_held():
            descriptor, self.path = tempfile.mkstemp(prefix="bnfold-spill-", suffix=".bin")
            atexit.register(self.close)
        self.handle = os.fdopen(descriptor, "wb", buffering=0)
        self.size = 0
        self.lock = threading.Lock()

    def append(self, array: np.ndarray) -> tuple[int, int]:
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        with self.lock:
            offset = self.size
            written = 0
            try:
                while written < len(data):
                    written += self.handle.write(data[written:])
            except OSError as error:  # a full temporary folder: the user's to fix (TMPDIR)
                self.handle.seek(offset)
                self.handle.truncate(offset)
                raise write_error(
                    f"{self.path} (new weights beyond the memory budget; set TMPDIR to a folder with space)",
                    error,
                ) from None
            self.size += len(data)
        return offset, len(data)

    def close(self) -> None:
        handle = getattr(self, "handle", None)  # absent if __init__ was interrupted after mkstemp
        with contextlib.suppress(OSError):
            if handle is not None:
                handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


_spill: _Spill | None = None
_spill_lock = threading.Lock()

MEMORY_LOCATION = "\0bnfold-memory/"
"""The start of the external-data location of a tensor whose value is in the in-memory store (see
the module docstring): a NUL byte, which no file name can hold, then a name."""


class _MemoryStore:
    """New weights of lazily loaded models, as read-only numpy arrays, by location
    (``MEMORY_LOCATION`` and a number). Entries are never removed: a model's tensors (and copies
    of them) may refer to one as long as the process lives, as they may to the spill file. So the
    memory budget is the process's, not one fold's (:func:`memory_store_bytes`): a service that
    folds many lazily loaded models holds at most the budget here, and spills the rest."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.count = 0
        self.bytes = 0
        self.lock = threading.Lock()

    def add(self, array: np.ndarray) -> str:
        with self.lock:
            self.count += 1
            location = f"{MEMORY_LOCATION}{self.count}"
            self.arrays[location] = array
            self.bytes += array.nbytes
        return location

    def get(self, location: str) -> np.ndarray:
        try:
            return self.arrays[location]
        except KeyError:
            raise ValueError(f"{location!r} is not in this process's store of new weights") from None


_memory = _MemoryStore()


def memory_store_bytes() -> int:
    """How many bytes of new weights this process holds in the in-memory store."""
    return _memory.bytes


def _spill_file() -> _Spill:
    global _spill
    with _spill_lock:
        if _spill is None:
            _spill = _Spill()
        return _spill


RAW_DATA, IN_MEMORY, SPILL = "raw_data", "memory", "spill"


def store_tensor(tensor: TensorProto, value: np.ndarray, *, keep: str = RAW_DATA) -> None:
    """Make ``tensor`` (name, doc string and metadata kept) hold ``value``.

    ``keep``: ``RAW_DATA`` copies the bytes into the protobuf (a self-contained model); for models
    loaded lazily, ``IN_MEMORY`` keeps the array itself in the in-memory store, not copied (it is
    made read-only: the caller must not write to it afterwards), and ``SPILL`` appends it to the
    spill file, so that new weights do not pile up in memory. Both leave ``tensor`` an
    external-data reference (see the module docstring); values numpy cannot lay out as raw bytes
    (strings, bool, byte-swapped data) always go to the protobuf.
    """
    array = np.asarray(value)
    if not array.dtype.isnative:  # a big-endian array: the same numbers, in this machine's order
        array = array.astype(array.dtype.newbyteorder("="))
    plain = sys.byteorder == "little" and array.dtype.kind in "fiu"
    if not plain:  # strings, bool, a big-endian machine: numpy_helper knows the layout
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        return
    for field in TensorProto.DESCRIPTOR.fields:
        if field.name in ("name", "doc_string", "metadata_props", "segment"):
            continue
        tensor.ClearField(field.name)
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    if keep == SPILL:
        offset, length = _spill_file().append(array)
        _point_at(tensor, _spill_file().path, offset, length)
    elif keep == IN_MEMORY:
        if isinstance(value, np.ndarray) and value.flags.c_contiguous:
            value.flags.writeable = False  # the caller's array is the value now: a write fails
        held = np.ascontiguousarray(array).view(np.ndarray)  # a plain view (not a Rounded)
        held.flags.writeable = False
        _point_at(tensor, _memory.add(held), 0, held.nbytes)
    else:
        tensor.raw_data = np.ascontiguousarray(array).tobytes()


# -- saving ----------------------------------------------------------------------------------------
@dataclass
class _Range:
    """``length`` bytes at ``offset`` of the file ``path``, copied into the output by the kernel."""

    path: str
    offset: int
    length: int


@dataclass
class _Serialized:
    """A tensor serialized only when written (so at most one is held in memory at a time)."""

    tensor: TensorProto
    length: int


# bytes, or a memoryview of a held array's buffer (format ``B``, see _buffer), written as it is
_Piece = bytes | memoryview | _Range | _Serialized


def _piece_length(piece: _Piece) -> int:
    return len(piece) if isinstance(piece, bytes | memoryview) else piece.length


class _Sink:
    """Writes pieces to a file descriptor: bytes batched, file ranges by ``os.copy_file_range``."""

    BATCH = 1 << 20

    def __init__(self, handle) -> None:
        self.handle = handle
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.written = 0

    def write(self, piece: _Piece) -> None:
        if isinstance(piece, _Range):
            self.flush()
            self._copy(piece)
            return
        data = piece.tensor.SerializeToString() if isinstance(piece, _Serialized) else piece
        if len(data) >= self.BATCH:  # a weight: written as it is, not joined with others (a copy)
            self.flush()
            write_all(self.handle, data)
            self.written += len(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.written += len(data)
        if self.pending_size >= self.BATCH:
            self.flush()

    def pad_to(self, alignment: int) -> int:
        padding = -self.written % alignment
        if padding:
            self.write(b"\0" * padding)
        return self.written

    def flush(self) -> None:
        if self.pending:
            write_all(self.handle, b"".join(self.pending) if len(self.pending) > 1 else self.pending[0])
            self.pending, self.pending_size = [], 0

    def _copy(self, piece: _Range) -> None:
        with open(piece.path, "rb") as source:
            offset, remaining = piece.offset, piece.length
            try:
                destination = self.handle.fileno()
            except (AttributeError, OSError, ValueError):  # not a file (a test's captured stdout)
                destination = None
            while remaining:
                try:
                    if destination is None:
                        raise OSError("no file descriptor to copy into")
                    copied = os.copy_file_range(source.fileno(), destination, remaining, offset)
                except (
                    AttributeError,
                    OSError,
                ):  # another file system, old kernel, pipe: read, write
                    copied = len(chunk := os.pread(source.fileno(), min(remaining, 1 << 24), offset))
                    if copied:
                        write_all(self.handle, chunk)
                if copied == 0:
                    raise OSError(f"{piece.path} ends before byte {piece.offset + piece.length}")
                offset += copied
                remaining -= copied
        self.written += piece.length


def save_model(model: ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` atomically; with external data when asked, or when it exceeds 2 GB.

    External data goes to ``<name>.data`` beside the model; the in-memory model is left as it was.
    Tensors whose bytes are on disk (a lazy load) are copied from their files, never read into memory;
    those in the in-memory store are written from their arrays' buffers. ``path`` may be ``-``
    (standard output), a device or a FIFO (written directly, inline only), or a symbolic link (the
    file it points to is replaced); see :mod:`bnfold.onnx.outputs`.
    """
    target = output_target(path)
    if external_data is None or not external_data:
        pieces = _inline_pieces(model)
        size = sum(_piece_length(piece) for piece in pieces)
        if external_data is None:
            external_data = size >= PROTOBUF_LIMIT
        elif size >= PROTOBUF_LIMIT:
            raise OutputError(f"{path}: the model is over 2 GB; write it with --external-data")
    if target.kind == "stdout" and sys.stdout.isatty():
        raise OutputError(
            "-: standard output is a terminal; redirect it to a file or a pipe to write the model there"
        )
    if external_data and not target.atomic:
        raise OutputError(
            f"{path}: a model with external data needs a regular file (its weights go beside it); "
            "write to a file, or pass --no-external-data"
        )
    data_path = target.real.with_name(target.real.name + ".data")
    if external_data and _location_text(data_path.name) != data_path.name:
        raise OutputError(
            f"{path}: its data file's name {data_path.name!r} is not UTF-8, which ONNX needs to name "
            "it in the model; choose another output name, or pass --no-external-data"
        )
    if not external_data:
        commit(target, _pieces_writer(pieces), stale=lambda: _own_data_file(target.real, data_path))
        return
    written: list[list[_Piece]] = []

    def write_data(handle) -> None:
        sink = _Sink(handle)
        with _externalized(_subgraph_initializers(model), data_path.name, sink):
            written.append(_external_pieces(model, data_path.name, sink))
        sink.flush()

    commit_pair(target, data_path, write_data, lambda: _pieces_writer(written[0]))


def _pieces_writer(pieces: list[_Piece]):
    def write(handle) -> None:
        sink = _Sink(handle)
        for piece in pieces:
            sink.write(piece)
        sink.flush()

    return write


def _own_data_file(model_path: Path, data_path: Path) -> Path | None:
    """``data_path`` when the model now at ``model_path`` (about to be replaced by a model with its
    weights inline) keeps its weights there, so that it would be left behind unused; else None —
    a file of that name that the old model does not use (or another program's file) is kept."""
    if not data_path.is_file() or not model_path.is_file():
        return None
    try:
        scanned = _scan_file(model_path)
        old = scanned[0] if scanned is not None else _parse_file(model_path)
    except (BnfoldError, OSError, ValueError):
        return None
    for tensor, _ in _model_tensors(old):
        location = _external_info(tensor).get("location") if uses_external_data(tensor) else None
        if location is not None and os.path.normpath(location) == data_path.name:
            return data_path
    return None


def _model_pieces(model: ModelProto, initializer_entries: list[list[_Piece]]) -> list[_Piece]:
    """The serialized model, in protobuf field order, with the graph's initializers given as pieces.

    The model and the graph are serialized without their initializers (small), and the
    initializers are placed where protobuf would have put them, so an unchanged model's bytes are
    what ``SerializeToString`` gives.
    """
    head = ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(head, field, value)
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    head_bytes, graph_bytes = head.SerializeToString(), graph.SerializeToString()
    graph_split = _split_after(graph_bytes, _GRAPH_INITIALIZER)
    body: list[_Piece] = [graph_bytes[:graph_split]]
    for entry in initializer_entries:
        body.append(_length_delimited(_GRAPH_INITIALIZER, sum(map(_piece_length, entry))))
        body += entry
    body.append(graph_bytes[graph_split:])
    head_split = _split_after(head_bytes, _MODEL_GRAPH)
    graph_length = sum(map(_piece_length, body))
    return [
        head_bytes[:head_split],
        _length_delimited(_MODEL_GRAPH, graph_length),
        *body,
        head_bytes[head_split:],
    ]


def _data_piece(tensor: TensorProto) -> _Range | memoryview | None:
    """Where the bytes of a tensor outside the protobuf are: a file range (on disk) or the buffer of
    its array (in the in-memory store); None for a tensor that holds its own data."""
    held = _in_memory(tensor)
    if held is not None:
        return _buffer(held)
    where = _on_disk(tensor)
    return None if where is None else _Range(*where)


def _inline_entry(tensor: TensorProto, data: _Range | memoryview) -> list[_Piece]:
    """A tensor whose bytes are outside the protobuf written inline: its header, with the raw_data
    field written from the file range or the array's buffer."""
    header = _copy_header(tensor, TensorProto()).SerializeToString()
    split = _split_after(header, _TENSOR_RAW_DATA)
    return [
        header[:split] + _length_delimited(_TENSOR_RAW_DATA, _piece_length(data)),
        data,
        header[split:],
    ]


def _inline_pieces(model: ModelProto) -> list[_Piece]:
    entries = []
    for tensor in model.graph.initializer:
        data = _data_piece(tensor)
        if data is not None:
            entries.append(_inline_entry(tensor, data))
        else:
            entries.append([_Serialized(tensor, tensor.ByteSize())])
    return _model_pieces(model, entries)


def _external_pieces(model: ModelProto, location: str, sink: _Sink) -> list[_Piece]:
    """Write the large initializers' bytes to ``sink`` (the data file); the model's pieces."""
    entries = []
    for tensor in model.graph.initializer:
        data = _data_piece(tensor)
        if data is not None:
            length = _piece_length(data)
            if length < EXTERNAL_DATA_THRESHOLD:
                entries.append(_inline_entry(tensor, data))
                continue
            offset = sink.pad_to(EXTERNAL_DATA_ALIGNMENT)
            sink.write(data)
        elif tensor.data_location != TensorProto.EXTERNAL and tensor.HasField("raw_data"):
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_DATA_THRESHOLD:
                entries.append([_Serialized(tensor, tensor.ByteSize())])
                continue
            offset = sink.pad_to(EXTERNAL_DATA_ALIGNMENT)
            sink.write(raw)
            sink.flush()
            length = len(raw)
            del raw
        else:
            entries.append([_Serialized(tensor, tensor.ByteSize())])
            continue
        header = _copy_header(tensor, TensorProto())
        _point_at(header, location, offset, length)
        entries.append([header.SerializeToString()])
    return _model_pieces(model, entries)


@contextlib.contextmanager
def _externalized(tensors: list[TensorProto], location: str, sink: _Sink) -> Iterator[None]:
    """Write large in-memory tensors to ``sink`` and point them at it; restore them on exit.

    (Used for subgraph initializers, which the model's own pieces serialize with their nodes.)
    """
    moved: list[tuple[TensorProto, bytes, bool]] = []
    try:
        for tensor in tensors:
            if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                continue
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_DATA_THRESHOLD:
                continue
            offset = sink.pad_to(EXTERNAL_DATA_ALIGNMENT)
            sink.write(raw)
            moved.append((tensor, raw, tensor.HasField("data_location")))
            _point_at(tensor, location, offset, len(raw))
        sink.flush()
        yield
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:  # leave the model byte-for-byte as it was, not with an explicit DEFAULT
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def _subgraph_initializers(model: ModelProto) -> list[TensorProto]:
    """Initializers of every subgraph (If/Loop/Scan bodies), not of the main graph."""
    initializers = list(model.graph.initializer)  # alive, so that their ids stay theirs
    main = {id(tensor) for tensor in initializers}
    return [
        tensor
        for tensor, is_initializer in _all_tensors(model.graph)
        if is_initializer and id(tensor) not in main
    ]
