"""Saving a model atomically and piece by piece: the protobuf is written in pieces (the graph's
initializers one at a time: their bytes copied from file ranges by the kernel, written from held
arrays' buffers, or serialized one at a time), never serialized whole. Models with external data get a
``<name>.data`` file beside them; the two are renamed together (see :mod:`bnfold.onnx.outputs`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import uses_external_data

from bnfold.errors import BnfoldError, OutputError
from bnfold.onnx.io.loading import parse_file
from bnfold.onnx.io.references import array_bytes, on_disk
from bnfold.onnx.io.store import in_memory
from bnfold.onnx.io.tensors import (
    EXTERNAL_DATA_ALIGNMENT,
    EXTERNAL_DATA_THRESHOLD,
    all_tensors,
    copy_field,
    copy_header,
    external_info,
    location_text,
    model_tensors,
    point_at,
)
from bnfold.onnx.io.wire import (
    GRAPH_INITIALIZER,
    MODEL_GRAPH,
    TENSOR_RAW_DATA,
    length_delimited,
    scan_file,
    split_after,
)
from bnfold.onnx.outputs import commit, commit_pair, output_target, write_all

PROTOBUF_LIMIT = 2**31 - 1


def exceeds_protobuf_limit(model: ModelProto) -> bool:
    """Whether ``model`` is too big to serialize as a single protobuf message (2 GB).

    The upb protobuf backend raises EncodeError from ``ByteSize()`` itself past the limit.
    """
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:
        return True


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


# bytes, or a memoryview of a held array's buffer (format ``B``, see array_bytes), written as it is
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
    those in a weight store's memory are written from their arrays' buffers. ``path`` may be ``-``
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
    if external_data and location_text(data_path.name) != data_path.name:
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
        scanned = scan_file(model_path)
        old = scanned[0] if scanned is not None else parse_file(model_path)
    except (BnfoldError, OSError, ValueError):
        return None
    for tensor, _ in model_tensors(old):
        location = external_info(tensor).get("location") if uses_external_data(tensor) else None
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
            copy_field(head, field, value)
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(graph, field, value)
    head_bytes, graph_bytes = head.SerializeToString(), graph.SerializeToString()
    graph_split = split_after(graph_bytes, GRAPH_INITIALIZER)
    body: list[_Piece] = [graph_bytes[:graph_split]]
    for entry in initializer_entries:
        body.append(length_delimited(GRAPH_INITIALIZER, sum(map(_piece_length, entry))))
        body += entry
    body.append(graph_bytes[graph_split:])
    head_split = split_after(head_bytes, MODEL_GRAPH)
    graph_length = sum(map(_piece_length, body))
    return [
        head_bytes[:head_split],
        length_delimited(MODEL_GRAPH, graph_length),
        *body,
        head_bytes[head_split:],
    ]


def _data_piece(tensor: TensorProto) -> _Range | memoryview | None:
    """Where the bytes of a tensor outside the protobuf are: a file range (on disk) or the buffer of
    its array (in a weight store's memory); None for a tensor that holds its own data."""
    held = in_memory(tensor)
    if held is not None:
        return array_bytes(held)
    where = on_disk(tensor)
    return None if where is None else _Range(*where)


def _inline_entry(tensor: TensorProto, data: _Range | memoryview) -> list[_Piece]:
    """A tensor whose bytes are outside the protobuf written inline: its header, with the raw_data
    field written from the file range or the array's buffer."""
    header = copy_header(tensor, TensorProto()).SerializeToString()
    split = split_after(header, TENSOR_RAW_DATA)
    return [
        header[:split] + length_delimited(TENSOR_RAW_DATA, _piece_length(data)),
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
        header = copy_header(tensor, TensorProto())
        point_at(header, location, offset, length)
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
            point_at(tensor, location, offset, len(raw))
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
        for tensor, is_initializer in all_tensors(model.graph)
        if is_initializer and id(tensor) not in main
    ]
