"""Where the new weights of lazily loaded models live: a :class:`WeightStore` that the caller (or
the fold, or the loaded model) owns — read-only arrays in memory up to the store's budget, and a
spill file of its own beyond it. :func:`store_tensor` puts a new value in a tensor: in raw_data, or
in a store.

A tensor refers to a store's array by an external-data location (``MEMORY_LOCATION``, the store's
key, a number), and to its spill file by that file's absolute path. Stores are found by key in a
registry of *open* stores that holds them weakly: the registry never keeps a store alive, so a store
lives exactly as long as whoever owns it (a :class:`~bnfold.onnx.io.LoadedModel`, a fold result,
the caller's ``with WeightStore() as store:``). Once it is closed or collected, its memory is freed
and its spill file deleted, and a model still referring to it gets a one-line error when read or
saved — never other bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
import threading
import weakref

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from bnfold.errors import ModelLoadError
from bnfold.onnx.io.tensors import MEMORY_LOCATION, STORE_KEY, memory_location, point_at
from bnfold.onnx.outputs import signals_held, write_error

DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""How many bytes of new weights a :class:`WeightStore` keeps in memory unless told otherwise (the
arrays the folds computed, not copied into the protobuf); the weights after those go to its spill
file. Big enough that a model under the 2 GB protobuf limit mostly stays in memory (the weights of
the layers that absorb a BN are a fraction of a model's), small enough that folding a model far
larger than memory still keeps one weight in memory at a time beyond it."""


class Spill:
    """A temporary file (in the system temporary directory) holding new values of tensors beyond a
    store's memory budget, so that folding a model larger than memory keeps one tensor in memory at
    a time. Only appended to, so a range mapped for reading never changes under its reader."""

    def __init__(self) -> None:
        descriptor, self.path = tempfile.mkstemp(prefix="bnfold-spill-", suffix=".bin")
        self.handle = os.fdopen(descriptor, "wb", buffering=0)
        self.size = 0

    def append(self, array: np.ndarray) -> tuple[int, int]:
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
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
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _Held:
    """What a store holds, apart from the store object itself, so that a finalizer can release it
    (a finalizer must not refer to the object it finalizes)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.spill: Spill | None = None

    def release(self) -> None:
        self.arrays.clear()
        spill, self.spill = self.spill, None
        if spill is not None:
            spill.close()


_keys = itertools.count(1)
_open_stores: weakref.WeakValueDictionary[int, WeightStore] = weakref.WeakValueDictionary()


class WeightStore:
    """The new weights of lazily loaded models that one owner folds: arrays in memory up to
    ``memory_budget`` bytes (default :data:`DEFAULT_MEMORY_BUDGET`), a spill file beyond it.

    Owned, not global: ``load_model(path, lazy=True)`` gives each loaded model one
    (``loaded.store``), ``fold_onnx`` makes one for a lazy model it is given without one
    (``result.store``), and a caller may share one between folds (``store=``), e.g. to give a
    service one budget for all its folds. Models refer to a store's weights until it is closed:
    :meth:`close` (or the end of a ``with`` block, or the store being garbage collected, or the
    process exiting) frees its memory and deletes its spill file. Thread-safe.
    """

    def __init__(self, memory_budget: int | None = None) -> None:
        self.memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        if self.memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, not {memory_budget!r}")
        self.key = next(_keys)
        self.memory_bytes = 0
        self._count = 0
        self._closed = False
        self._lock = threading.Lock()
        self._held = _Held()
        # Registered for release at exit (and on collection) before anything is held; an interrupt
        # is held back until then, so only a SIGKILL can leave a spill file behind.
        with signals_held():
            self._finalizer = weakref.finalize(self, self._held.release)
            _open_stores[self.key] = self

    # -- putting weights in ------------------------------------------------------------------------
    def keep(self, tensor: TensorProto, value: np.ndarray) -> None:
        """Make ``tensor`` refer to ``value`` in this store: in memory while the budget allows
        (the array itself, made read-only: the caller must not write to it afterwards), else
        appended to the spill file."""
        array = np.asarray(value)
        with self._lock:
            self._check_open()
            if self.memory_bytes + array.nbytes <= self.memory_budget:
                if isinstance(value, np.ndarray) and value.flags.c_contiguous:
                    value.flags.writeable = False  # the caller's array is the value now: a write fails
                held = np.ascontiguousarray(array).view(np.ndarray)  # a plain view (not a Rounded)
                held.flags.writeable = False
                self._count += 1
                location = f"{MEMORY_LOCATION}{self.key}/{self._count}"
                self._held.arrays[location] = held
                self.memory_bytes += held.nbytes
                point_at(tensor, location, 0, held.nbytes, store_key=self.key)
                return
            spill = self._spill()
            offset, length = spill.append(array)
            point_at(tensor, spill.path, offset, length, store_key=self.key)

    def _spill(self) -> Spill:
        if self._held.spill is None:
            with signals_held():  # the file and its removal are registered together
                self._held.spill = Spill()
        return self._held.spill

    # -- reading them back -------------------------------------------------------------------------
    def get(self, location: str) -> np.ndarray:
        try:
            return self._held.arrays[location]
        except KeyError:
            raise ValueError(f"{location!r} is not in this store of new weights") from None

    @property
    def spill_bytes(self) -> int:
        """How many bytes of new weights went to the spill file (beyond the memory budget)."""
        spill = self._held.spill
        return 0 if spill is None else spill.size

    @property
    def spill_path(self) -> str | None:
        spill = self._held.spill
        return None if spill is None else spill.path

    # -- lifetime ----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the arrays and delete the spill file; models that still refer to them can no longer
        be read or saved (a one-line error says so). Idempotent."""
        with self._lock:
            self._closed = True
            _open_stores.pop(self.key, None)
            self.memory_bytes = 0
            self._finalizer()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this WeightStore is closed; make a new one for another fold")

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else f"{self.memory_bytes} bytes in memory, {self.spill_bytes} spilled"
        )
        return f"WeightStore(#{self.key}, budget {self.memory_budget}: {state})"


def store_tensor(tensor: TensorProto, value: np.ndarray, *, store: WeightStore | None = None) -> None:
    """Make ``tensor`` (name, doc string and metadata kept) hold ``value``.

    Without ``store`` the bytes go into the protobuf (a self-contained model). With one (for models
    loaded lazily), ``store`` keeps the value — in memory or in its spill file, see
    :meth:`WeightStore.keep` — and ``tensor`` becomes an external-data reference to it (see
    :mod:`bnfold.onnx.io`). Values numpy cannot lay out as raw bytes (strings, bool, byte-swapped
    data) always go to the protobuf.
    """
    array = np.asarray(value)
    if not array.dtype.isnative:  # a big-endian array: the same numbers, in this machine's order
        array = array.astype(array.dtype.newbyteorder("="))
        value = array
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
    if store is not None:
        store.keep(tensor, value)
    else:
        tensor.raw_data = np.ascontiguousarray(array).tobytes()


def in_memory(tensor: TensorProto) -> np.ndarray | None:
    """The (read-only) array of a tensor whose value is in a store's memory, shaped as the tensor
    says, else None.

    Raises ModelLoadError when that store is closed (or the reference is from another process), and
    ValueError for a shape that does not hold the array's elements.
    """
    location = memory_location(tensor)
    if location is None:
        return None
    key = location[len(MEMORY_LOCATION) :].split("/", 1)[0]
    store = _open_stores.get(int(key)) if key.isdigit() else None
    if store is None:
        raise ModelLoadError(
            f"tensor {tensor.name!r}: its new weight was kept in a weight store that is closed; "
            "save or verify a lazily folded model while its store (loaded.store, result.store) is open"
        )
    held = store.get(location)
    shape = tuple(tensor.dims)
    return held if held.shape == shape else held.reshape(shape)  # a view: read-only too


def store_of(model: ModelProto) -> WeightStore | None:
    """The open weight store a lazily loaded model belongs to (the ``store`` of the
    :class:`~bnfold.onnx.io.LoadedModel` it came from, or the one a fold of it used), if any.

    Its lazy references name it, so that ``fold_onnx(loaded.model)`` keeps new weights where
    ``loaded`` does, with ``loaded``'s lifetime.
    """
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == STORE_KEY and entry.value.isdigit():
                store = _open_stores.get(int(entry.value))
                if store is not None and not store.closed:
                    return store
    return None
