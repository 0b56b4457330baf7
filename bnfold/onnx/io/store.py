"""Where the new weights of lazily loaded models live: a process-wide in-memory store of read-only
arrays (up to the budget the fold keeps, ``NEW_WEIGHTS_MEMORY_BUDGET``), and a spill file beyond
it; :func:`store_tensor` puts a new value in a tensor, in raw_data, the store or the spill file."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bnfold.onnx.io.tensors import MEMORY_LOCATION, memory_location, point_at
from bnfold.onnx.outputs import signals_held, write_error


class Spill:
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


_spill: Spill | None = None
_spill_lock = threading.Lock()


class MemoryStore:
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


memory = MemoryStore()


def memory_store_bytes() -> int:
    """How many bytes of new weights this process holds in the in-memory store."""
    return memory.bytes


def spill_file() -> Spill:
    global _spill
    with _spill_lock:
        if _spill is None:
            _spill = Spill()
        return _spill


RAW_DATA, IN_MEMORY, SPILL = "raw_data", "memory", "spill"


def store_tensor(tensor: TensorProto, value: np.ndarray, *, keep: str = RAW_DATA) -> None:
    """Make ``tensor`` (name, doc string and metadata kept) hold ``value``.

    ``keep``: ``RAW_DATA`` copies the bytes into the protobuf (a self-contained model); for models
    loaded lazily, ``IN_MEMORY`` keeps the array itself in the in-memory store, not copied (it is
    made read-only: the caller must not write to it afterwards), and ``SPILL`` appends it to the
    spill file, so that new weights do not pile up in memory. Both leave ``tensor`` an
    external-data reference (see :mod:`bnfold.onnx.io`); values numpy cannot lay out as raw bytes
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
        offset, length = spill_file().append(array)
        point_at(tensor, spill_file().path, offset, length)
    elif keep == IN_MEMORY:
        if isinstance(value, np.ndarray) and value.flags.c_contiguous:
            value.flags.writeable = False  # the caller's array is the value now: a write fails
        held = np.ascontiguousarray(array).view(np.ndarray)  # a plain view (not a Rounded)
        held.flags.writeable = False
        point_at(tensor, memory.add(held), 0, held.nbytes)
    else:
        tensor.raw_data = np.ascontiguousarray(array).tobytes()


def in_memory(tensor: TensorProto) -> np.ndarray | None:
    """The (read-only) array of a tensor whose value is in the in-memory store, shaped as the
    tensor says, else None.

    Raises ValueError for a reference the store does not hold (a model from another process) or a
    shape that does not hold the array's elements.
    """
    location = memory_location(tensor)
    if location is None:
        return None
    held = memory.get(location)
    shape = tuple(tensor.dims)
    return held if held.shape == shape else held.reshape(shape)  # a view: read-only too
