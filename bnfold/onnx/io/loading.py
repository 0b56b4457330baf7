"""Loading ONNX files with clear errors: every failure is a :class:`ModelLoadError` whose message names
the file and the problem; external data is checked to lie inside the model's folder and inside its
file. The structure is checked with ``onnx.checker`` on a copy whose large tensors are one-element
stand-ins, with the sizes checked here; the weights are never serialized to check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import uses_external_data

from bnfold.errors import InternalError, ModelLoadError
from bnfold.onnx.io.references import file_identity
from bnfold.onnx.io.store import WeightStore
from bnfold.onnx.io.tensors import (
    EXTERNAL_DATA_THRESHOLD,
    copy_field,
    copy_header,
    external_info,
    is_repeated,
    model_tensors,
    plain_item_size,
    point_at,
)
from bnfold.onnx.io.wire import scan_file


@dataclass
class LoadedModel:
    """A model read by :func:`load_model`, with where it came from.

    A lazy load (``lazy=True``) also owns ``store``, the :class:`WeightStore` that a fold of it
    keeps its new weights in (``fold_onnx(loaded.model, inplace=True, store=loaded.store)``): the
    folded model can be read and saved while it is open. ``with load_model(...) as loaded:`` (or
    ``loaded.close()``) releases it; so does dropping the last reference to it.
    """

    model: ModelProto
    path: Path
    used_external_data: bool
    # The external data files the model was read from (resolved), so callers can refuse to write
    # over them.
    external_files: tuple[Path, ...] = ()
    # Whether large initializers were left on disk (load_model(..., lazy=True)); see has_data_on_disk.
    lazy: bool = False
    store: WeightStore | None = None

    def close(self) -> None:
        """Release the new weights a fold kept in this model's store (memory and spill file)."""
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_model(
    path: str | os.PathLike, *, check: bool = True, lazy: bool = False, store: WeightStore | None = None
) -> LoadedModel:
    """Read an ONNX file; raise :class:`ModelLoadError` with a one-line reason when it is not one.

    ``lazy=True`` leaves the large initializers of the main graph on disk, as external-data
    references with absolute paths into the source files (see :mod:`bnfold.onnx.io`): the model is
    then only good for bnfold's own fold, :func:`save_model` and verifier, which read them. Its
    ``store`` (``store`` if given, else a new :class:`WeightStore`) is where a fold keeps new weights.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    model, lazy_ranges = (scan_file(path) if lazy else None) or (parse_file(path), [])
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, opset or IR version)")
    field = _non_utf8_field(model)
    if field is not None:
        raise ModelLoadError(f"{path}: invalid ONNX model (text in {field} is not UTF-8)")
    used_external_data = _uses_external_data(model)
    if lazy and store is None:
        store = WeightStore()
    store_key = store.key if lazy and store is not None else None
    external_files: tuple[Path, ...] = ()
    if used_external_data:
        try:
            external_files = _external_files(model, path.parent)
            _resolve_external_data(model, path.parent, keep_on_disk=lazy, store_key=store_key)
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise ModelLoadError(f"{path}: cannot load its external data ({_one_line(error)})") from None
    if check:
        _check(model, path, lazy_ranges)
    source = str(path.resolve())
    identity = file_identity(source) if lazy_ranges else None
    for tensor, offset, length in lazy_ranges:
        point_at(tensor, source, offset, length, identity, store_key)
    return LoadedModel(
        model, path, used_external_data, external_files, lazy=lazy, store=store if lazy else None
    )


def parse_file(path: Path) -> ModelProto:
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


def _resolve_external_data(
    model: ModelProto, directory: Path, *, keep_on_disk: bool, store_key: int | None = None
) -> None:
    """Check every external tensor's file and range (model-local functions included); with
    ``keep_on_disk`` keep the large main-graph initializers on disk (absolute locations), and load
    the rest (small ones, subgraph initializers, Constant values) into raw_data, so that no
    reference relative to the source's folder survives into an output written elsewhere."""
    root = directory.resolve()
    initializers = list(model.graph.initializer)  # alive, so that their ids stay theirs
    main = {id(tensor) for tensor in initializers}
    for tensor, _ in list(model_tensors(model)):
        if not uses_external_data(tensor):
            continue
        info = external_info(tensor)
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
        large = length >= EXTERNAL_DATA_THRESHOLD and plain_item_size(tensor.data_type)
        if keep_on_disk and id(tensor) in main and large:
            point_at(tensor, str(target), offset, length, file_identity(target), store_key)
        else:  # read here (onnx's reader cannot open a folder whose name is not UTF-8)
            with open(target, "rb") as handle:
                tensor.raw_data = os.pread(handle.fileno(), length, offset)
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def _external_files(model: ModelProto, directory: Path) -> tuple[Path, ...]:
    files = set()
    for tensor, _ in model_tensors(model):
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
        repeated = is_repeated(field)
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
    return any(uses_external_data(tensor) for tensor, _ in model_tensors(model))


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
            copy_field(copy, field, value)
    graph = copy.graph
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(graph, field, value)
    for tensor in model.graph.initializer:
        _copy_as_stand_in(tensor, graph.initializer.add(), lengths.get(id(tensor)))
    return copy


def _copy_as_stand_in(tensor: TensorProto, target: TensorProto, length: int | None) -> None:
    """A copy of ``tensor`` for the checker: a large one becomes one element of its type."""
    item_size = plain_item_size(tensor.data_type)
    external = tensor.data_location == TensorProto.EXTERNAL
    if item_size is None or not (external or length is not None or tensor.HasField("raw_data")):
        target.CopyFrom(tensor)
        return
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if length is None:
        length = int(external_info(tensor)["length"]) if external else len(tensor.raw_data)
    if length < EXTERNAL_DATA_THRESHOLD:
        target.CopyFrom(tensor)
        return
    needed = count * item_size
    if length < needed:
        raise ValueError(
            f"TensorProto (tensor name: {tensor.name}) raw_data size ({length} bytes) is too small for "
            f"the declared shape and type ({needed} bytes required)."
        )
    copy_header(tensor, target)
    del target.dims[:]
    target.dims.append(1)
    target.raw_data = bytes(item_size)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (the checker splits one sentence over several lines)."""
    text = " ".join(str(error).replace("==> Context:", "").split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
