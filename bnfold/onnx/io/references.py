"""Lazy references: tensors whose bytes stay in a file (a source ``.onnx``, its external data, the
spill file of a weight store) or in a weight store's memory, and reading their values (a file
range mapped read-only).

A reference to a source file carries the file's identity (device, inode, size, modification time),
so a read after the file was saved over or edited is refused rather than reading other bytes.
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from bnfold.errors import ModelLoadError
from bnfold.onnx.io.store import in_memory
from bnfold.onnx.io.tensors import (
    IDENTITY_KEY,
    copy_header,
    external_info,
    location_path,
    memory_location,
    plain_item_size,
)


def file_identity(path: str | os.PathLike) -> str:
    """Which file ``path`` is now, and which version of it: device, inode, size, modification time."""
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"


# -- tensors whose bytes are on disk -------------------------------------------------------------
def has_data_on_disk(model: ModelProto) -> bool:
    """Whether any main-graph initializer keeps its bytes outside the protobuf: a reference to bytes
    in a file (a lazy load, a tensor a fold spilled) or to a weight store's memory — so that the model
    must be written with :func:`save_model`, not serialized."""
    return any(tensor.data_location == TensorProto.EXTERNAL for tensor in model.graph.initializer)


def is_lazy(model: ModelProto) -> bool:
    """Whether ``model`` was loaded with ``load_model(..., lazy=True)`` (a main-graph initializer
    refers to a file by absolute path, or to a weight store): a fold then keeps its large new
    weights in a weight store. A model whose external data was merely not loaded is not."""
    return any(
        on_disk(tensor) is not None or memory_location(tensor) is not None
        for tensor in model.graph.initializer
    )


def on_disk(tensor: TensorProto) -> tuple[str, int, int] | None:
    """(absolute path, offset, length) of a tensor whose bytes were left on disk, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = external_info(tensor)
    location = location_path(info.get("location", ""))
    if not os.path.isabs(location) or "length" not in info:
        return None
    identity = info.get(IDENTITY_KEY)
    if identity is not None and _current_identity(location) != identity:
        # Saved over (an in-place save renames a new file over the source) or edited since the load:
        # the offsets would now read other bytes.
        raise ModelLoadError(
            f"{location}: changed since the model was loaded lazily (saved over?); load it again"
        )
    return location, int(info.get("offset", 0)), int(info["length"])


def _current_identity(path: str) -> str | None:
    try:
        return file_identity(path)
    except OSError:
        return None


def array_bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, not copied (one-dimensional, format ``B``)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def read_tensor(tensor: TensorProto) -> np.ndarray:
    """The value of a tensor whose bytes are on disk (absolute location), read from its file range,
    or in a weight store's memory (that very array, read-only).

    Raises ValueError when the bytes do not match the type and shape.
    """
    held = in_memory(tensor)
    if held is not None:
        return held
    where = on_disk(tensor)
    if where is None:
        raise ValueError(f"its external data was not loaded ({external_info(tensor).get('location')!r})")
    location, offset, length = where
    data = _mapped(location, offset, length)
    item_size = plain_item_size(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if item_size is not None and sys.byteorder == "little" and tensor.data_type != TensorProto.BOOL:
        if count * item_size != length:
            raise ValueError(f"{length} bytes for {count} elements of {item_size} bytes")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
    header = copy_header(tensor, TensorProto())
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
    try:
        handle = open(location, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        raise ModelLoadError(
            f"{location}: no longer exists (a source file deleted since the lazy load, or the spill "
            "file of a weight store that was closed); load and fold again"
        ) from None
    with handle:
        if os.fstat(handle.fileno()).st_size < offset + length:
            raise ValueError(f"{location} ends before byte {offset + length}")
        if length == 0:
            return memoryview(b"")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        mapping = mmap.mmap(handle.fileno(), offset + length - start, access=mmap.ACCESS_READ, offset=start)
    return memoryview(mapping)[offset - start :]
