"""Loading ONNX files with clear errors, and writing them atomically (external data included).

Loading: every failure is a :class:`ModelLoadError` whose message names the file and the problem.
Saving: the model is written to a temporary file in the target directory and renamed over the
target only once complete, so a reader (or an interrupted run) sees the old file or the new one,
never half of one. Models that used external data are written with external data.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from bnfold.errors import ModelLoadError, OutputError

__all__ = [
    "LoadedModel",
    "load_model",
    "save_model",
    "check_output_path",
    "write_atomically",
    "exceeds_protobuf_limit",
]

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1024  # bytes; smaller tensors stay inside the .onnx file
EXTERNAL_DATA_ALIGNMENT = 4096  # lets ONNX Runtime memory-map tensors


@dataclass
class LoadedModel:
    model: ModelProto
    path: Path
    used_external_data: bool


def load_model(path: str | os.PathLike, *, check: bool = True) -> LoadedModel:
    """Read an ONNX file; raise :class:`ModelLoadError` with a one-line reason when it is not one."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
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
    del data
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, opset or IR version)")
    used_external_data = _uses_external_data(model)
    if used_external_data:
        try:
            load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise ModelLoadError(f"{path}: cannot load its external data ({error})") from None
    if check:
        _check(model, path)
    return LoadedModel(model=model, path=path, used_external_data=used_external_data)


def _uses_external_data(model: ModelProto) -> bool:
    # Every tensor, as onnx's loader sees them: subgraph initializers and Constant values included.
    return any(uses_external_data(tensor) for tensor, _ in _all_tensors(model.graph))


def _all_tensors(graph: GraphProto) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is_initializer) for every tensor of ``graph`` and its subgraphs."""
    for tensor in graph.initializer:
        yield tensor, True
    for node in graph.node:
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


def _check(model: ModelProto, path: Path) -> None:
    try:
        if not exceeds_protobuf_limit(model):
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{path}: invalid ONNX model ({first_line})") from None


def exceeds_protobuf_limit(model: ModelProto) -> bool:
    """Whether ``model`` is too big to serialize as a single protobuf message (2 GB).

    The upb protobuf backend raises EncodeError from ``ByteSize()`` itself past the limit.
    """
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:
        return True


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be written."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected an output file name")
    if not directory.is_dir():
        raise OutputError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{path}: directory {directory} is not writable")
    return path


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = check_output_path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(path))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _file_mode(path: Path) -> int:
    """The mode a plain write would give ``path``: its current mode, else 0o666 less the umask.

    (mkstemp creates its files 0o600, which would leave every output readable by its owner only.)
    """
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_model(model: ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` atomically; with external data when asked, or when it exceeds 2 GB.

    External data goes to ``<name>.data`` beside the model; the in-memory model is left as it was.
    """
    path = check_output_path(path)
    if external_data is None:
        external_data = exceeds_protobuf_limit(model)
    if not external_data:
        write_atomically(path, model.SerializeToString())
        return
    data_path = path.with_name(path.name + ".data")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle, _externalized(model, data_path.name, handle):
            handle.flush()
            os.fsync(handle.fileno())
            serialized = model.SerializeToString()
        # Data first, then the model that points at it: the model never names a missing file.
        os.chmod(temporary, _file_mode(data_path))
        os.replace(temporary, data_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    write_atomically(path, serialized)


@contextlib.contextmanager
def _externalized(model: ModelProto, location: str, handle) -> Iterator[None]:
    """Stream large initializers to ``handle`` and point the model at them; restore on exit."""
    moved: list[tuple[TensorProto, bytes, bool]] = []
    try:
        offset = 0
        for tensor in _all_initializers(model):
            if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                continue
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_DATA_THRESHOLD:
                continue
            padding = -offset % EXTERNAL_DATA_ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            handle.write(raw)
            moved.append((tensor, raw, tensor.HasField("data_location")))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
        yield
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:  # leave the model byte-for-byte as it was, not with an explicit DEFAULT
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def _all_initializers(model: ModelProto) -> Iterator[TensorProto]:
    """Initializers of the main graph and of every subgraph (If/Loop/Scan bodies)."""
    return (tensor for tensor, is_initializer in _all_tensors(model.graph) if is_initializer)
