"""Loading ONNX files with clear errors, and writing them atomically (external data included).

Loading: every failure is a :class:`ModelLoadError` whose message names the file and the problem.
Saving: the model is written to a temporary file in the target directory and renamed over the
target only once complete, so a reader (or an interrupted run) sees the old file or the new one,
never half of one. Models that used external data are written with external data; the model and
its data file are both written to temporary files first and then renamed one after the other with
SIGINT/SIGTERM held back, so an interrupt never leaves the old model naming the new data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
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
    # The external data files the model was read from (resolved), so callers can refuse to write
    # over them.
    external_files: tuple[Path, ...] = ()


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
    field = _non_utf8_field(model)
    if field is not None:
        raise ModelLoadError(f"{path}: invalid ONNX model (text in {field} is not UTF-8)")
    used_external_data = _uses_external_data(model)
    external_files: tuple[Path, ...] = ()
    if used_external_data:
        external_files = _external_files(model, path.parent)
        try:
            load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise ModelLoadError(f"{path}: cannot load its external data ({error})") from None
    if check:
        _check(model, path)
    return LoadedModel(model, path, used_external_data, external_files)


def _external_files(model: ModelProto, directory: Path) -> tuple[Path, ...]:
    files = set()
    for tensor, _ in _all_tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and uses_external_data(tensor):
                files.add((directory / entry.value).resolve())
    return tuple(sorted(files))


def _non_utf8_field(message) -> str | None:
    """The path of the first string field whose bytes are not UTF-8, or None.

    ONNX strings are UTF-8 and the checker does not look; the protobuf runtime hands such a field
    back as bytes, on which names, reports and ONNX Runtime's Python binding all fail. Bytes fields
    (tensor data, string attributes) are not read, so no weights are copied.
    """
    for field in message.DESCRIPTOR.fields:
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # older protobuf
            repeated = field.label == field.LABEL_REPEATED
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
        raise ModelLoadError(f"{path}: invalid ONNX model ({_one_line(error)})") from None


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
    temporary = None
    try:
        temporary = _write_temporary(path, data)
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _write_temporary(path: Path, data: bytes) -> str:
    """A complete, fsynced copy of ``data`` in a temporary file beside ``path``, with ``path``'s mode."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(path))
    except BaseException:
        _remove(temporary)
        raise
    return temporary


def _remove(temporary: str | None) -> None:
    if temporary is not None:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then deliver them.

    Only the main thread can install handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler not installed from Python, which cannot be restored
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


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
    descriptor, data_temporary = tempfile.mkstemp(
        prefix=f".{data_path.name}.", suffix=".tmp", dir=path.parent
    )
    model_temporary = None
    try:
        with os.fdopen(descriptor, "wb") as handle, _externalized(model, data_path.name, handle):
            handle.flush()
            os.fsync(handle.fileno())
            serialized = model.SerializeToString()
        os.chmod(data_temporary, _file_mode(data_path))
        model_temporary = _write_temporary(path, serialized)
        # Both files are complete: rename the data, then the model that points at it (the model
        # never names a missing file), with no interrupt in between to split the pair.
        with _signals_held():
            os.replace(data_temporary, data_path)
            data_temporary = None
            os.replace(model_temporary, path)
    except BaseException:
        _remove(data_temporary)
        _remove(model_temporary)
        raise


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
