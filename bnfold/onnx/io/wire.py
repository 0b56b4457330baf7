"""The protobuf wire format, just enough to find where each large initializer's raw_data lies in an
``.onnx`` file (so a lazy load leaves it there) and to write a model piece by piece (a field's tag
and length, where a field goes)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from bnfold.onnx.io.tensors import EXTERNAL_DATA_THRESHOLD, plain_item_size


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


def length_delimited(number: int, length: int) -> bytes:
    """The tag and length that precede a length-delimited field of ``length`` bytes."""
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def split_after(serialized: bytes, number: int) -> int:
    """The offset of the first field numbered above ``number`` (protobuf writes fields in order)."""
    for field_number, field_start, _, _ in _fields(serialized, 0, len(serialized)):
        if field_number > number:
            return field_start
    return len(serialized)


MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_DATA_TYPE, TENSOR_RAW_DATA, TENSOR_DATA_LOCATION = 2, 9, 14


def scan_file(path: Path) -> tuple[ModelProto, list[tuple[TensorProto, int, int]]] | None:
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
        if number == MODEL_GRAPH:
            if graph_range is not None or buffer[field_start] != (MODEL_GRAPH << 3 | 2):
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
        if number != GRAPH_INITIALIZER or buffer[field_start] != (GRAPH_INITIALIZER << 3 | 2):
            graph_parts.append(buffer[field_start:end])
            continue
        raw, located, count, data_type = None, False, 0, 0
        for tensor_number, tensor_field, tensor_value, tensor_end in _fields(buffer, value_start, end):
            if tensor_number == TENSOR_RAW_DATA:
                count += 1
                raw = (tensor_field, tensor_value, tensor_end)
            elif tensor_number == TENSOR_DATA_TYPE and buffer[tensor_field] == TENSOR_DATA_TYPE << 3:
                data_type = _varint(buffer, tensor_value, tensor_end)[0]
            located |= tensor_number == TENSOR_DATA_LOCATION
        plain = plain_item_size(data_type) is not None
        if count == 1 and plain and not located and raw[2] - raw[1] >= EXTERNAL_DATA_THRESHOLD:
            ranges.append((len(initializers), raw[1], raw[2] - raw[1]))
            initializers.append(buffer[value_start : raw[0]] + buffer[raw[2] : end])
        else:
            initializers.append(buffer[value_start:end])
    if not ranges:
        return None
    graph = b"".join(graph_parts) + b"".join(
        length_delimited(GRAPH_INITIALIZER, len(tensor)) + tensor for tensor in initializers
    )
    model = ModelProto()
    model.ParseFromString(b"".join(top) + length_delimited(MODEL_GRAPH, len(graph)) + graph)
    return model, [(model.graph.initializer[index], offset, length) for index, offset, length in ranges]
