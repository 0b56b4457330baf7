"""Before/after facts of a fold: operator counts, parameter bytes, files with their sizes and digests.

What onnxsim and onnxslim users look for after an optimization: a table of operator counts before and
after, and how much smaller the weights and the file got. Everything here reads the model as it is
(lazily loaded weights included: their sizes come from their shapes, never from reading them).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper

__all__ = [
    "FileInfo",
    "ModelStats",
    "file_info",
    "model_stats",
    "walk_graphs",
    "node_label",
    "comparison_table",
]

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class FileInfo:
    """A file read or written: its path, size in bytes and SHA-256 digest (hex)."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class ModelStats:
    """One model's operator counts (all graphs, subgraphs included), parameter bytes and files."""

    op_counts: dict[str, int]
    parameter_bytes: int
    files: list[FileInfo] = field(default_factory=list)

    @property
    def file_bytes(self) -> int | None:
        """Bytes on disk (the model file and its external data), None before it is written."""
        return sum(info.bytes for info in self.files) if self.files else None

    @property
    def nodes(self) -> int:
        return sum(self.op_counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "op_counts": dict(sorted(self.op_counts.items())),
            "parameter_bytes": self.parameter_bytes,
            "file_bytes": self.file_bytes,
        }


def node_label(node: NodeProto) -> str:
    """How the report names a node: its name, or its op and first output when it has none."""
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def walk_graphs(graph: GraphProto, path: str = "main") -> Iterator[tuple[str, GraphProto]]:
    """Every graph with the path the report gives it (``main``, ``main/loop.body``, ...)."""
    yield path, graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                yield from walk_graphs(attribute.g, f"{path}/{node_label(node)}.{attribute.name}")
            elif attribute.type == AttributeProto.GRAPHS:
                for position, subgraph in enumerate(attribute.graphs):
                    name = f"{attribute.name}[{position}]"
                    yield from walk_graphs(subgraph, f"{path}/{node_label(node)}.{name}")


def op_key(node: NodeProto) -> str:
    """``Conv``, or ``domain:Op`` outside the default domain (a custom op is not an ONNX Conv)."""
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"


def model_stats(model: ModelProto, files: Iterable[FileInfo] = ()) -> ModelStats:
    """Operator counts and parameter bytes (initializers and Constant values of every graph)."""
    counts: Counter[str] = Counter()
    parameter_bytes = 0
    for _, graph in walk_graphs(model.graph):
        for tensor in graph.initializer:
            parameter_bytes += tensor_bytes(tensor)
        for node in graph.node:
            counts[op_key(node)] += 1
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                for attribute in node.attribute:
                    if attribute.type == AttributeProto.TENSOR:
                        parameter_bytes += tensor_bytes(attribute.t)
    return ModelStats(dict(counts), parameter_bytes, list(files))


def tensor_bytes(tensor: TensorProto) -> int:
    """The size of a tensor's values, from its shape and type (never reads external or lazy data)."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(value) for value in tensor.string_data)
    elements = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    try:
        item_size = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    if tensor.data_type in _FOUR_BIT_TYPES:
        return (elements + 1) // 2
    return elements * item_size


_FOUR_BIT_TYPES = {
    getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, name)
}


def file_info(path: str | os.PathLike) -> FileInfo:
    """Size and SHA-256 of a file, read in blocks (a model of gigabytes is never held in memory)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
            size += len(block)
    return FileInfo(os.fspath(path), size, digest.hexdigest())


def model_files(path: str | os.PathLike, external: Iterable[Path] = ()) -> list[FileInfo]:
    """The model file and the external data files it reads, each with its digest."""
    return [file_info(path), *(file_info(data) for data in external)]


def comparison_table(before: ModelStats | None, after: ModelStats) -> str:
    """Operator counts before and after, then parameter and file bytes, as a table."""
    header = ("op", "before", "after", "change")
    rows = [header]
    names = sorted(set(after.op_counts) | set(before.op_counts if before else {}))
    for name in names:
        rows.append(
            _row(name, before.op_counts.get(name, 0) if before else None, after.op_counts.get(name, 0))
        )
    rows.append(_row("nodes", before.nodes if before else None, after.nodes))
    rows.append(_row("parameters", before.parameter_bytes if before else None, after.parameter_bytes, _size))
    if after.file_bytes is not None:
        rows.append(_row("file size", before.file_bytes if before else None, after.file_bytes, _size))
    widths = [max(len(row[index]) for row in rows) for index in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _row(name: str, before: int | None, after: int, render=str) -> tuple[str, str, str, str]:
    if before is None:
        return (name, "", render(after), "")
    change = after - before
    text = "" if change == 0 else (f"+{render(change)}" if change > 0 else f"-{render(-change)}")
    return (name, render(before), render(after), text)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
