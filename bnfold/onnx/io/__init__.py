"""Reading and writing ONNX files: loading with clear errors, weights left on disk, atomic saving.

With ``load_model(..., lazy=True)`` the weights stay on disk: the loader reads the protobuf
structure and leaves each large initializer of the main graph as a reference (absolute path,
offset, length) to its bytes in the source file — the ``.onnx`` itself for inline weights, found by
walking the protobuf wire format, or the external data file. :func:`read_tensor` maps one such
tensor (read-only, not copied) when a fold needs it; new values go to a :class:`WeightStore` that
the loaded model (or the fold result, or the caller) owns — in memory up to its budget, in its own
spill file beyond (:func:`store_tensor`) — and :func:`save_model` streams every referenced range
into the output (``os.copy_file_range``), so no weight is held in memory that a fold does not change.

Where a lazily loaded model's main-graph initializer keeps its bytes, told by its external-data
``location`` (``data_location`` is EXTERNAL in all three; small tensors keep raw_data):

- an absolute path (with ``offset`` and ``length``): a range of the source ``.onnx`` file, of its
  external data file, or of a store's spill file — mapped read-only by :func:`read_tensor`, copied into
  the output by the kernel;
- ``MEMORY_LOCATION``, a store's key and a number (``"\\0bnfold-memory/3/12"``; the NUL byte makes
  it a name no file can have, so no file is ever opened by it, and ONNX tools refuse it rather than
  read something else): a new weight a fold kept as a numpy array in a :class:`WeightStore`'s
  memory, never copied into the protobuf. :func:`read_tensor` returns that array (read-only) and
  :func:`save_model` writes it from the array's buffer, inline or as external data. The arrays live
  as long as their store is open; after ``store.close()`` (or its owner is dropped) a read or save
  of a model still referring to them is a one-line error.

Such references are only understood by this package: ``onnx.save`` of a lazily loaded model would
not write its weights. Models that were not loaded lazily (``fold_onnx(path)``,
``fold_onnx(ModelProto)``) never get them: their new weights are plain raw_data.

The rooms, lowest first (each imports only those above it):

- :mod:`~bnfold.onnx.io.tensors`: TensorProto helpers and the external-data location vocabulary;
- :mod:`~bnfold.onnx.io.wire`: the protobuf wire scanner (where raw_data lies in a file);
- :mod:`~bnfold.onnx.io.store`: :class:`WeightStore` (new weights: memory, a spill file),
  :func:`store_tensor`;
- :mod:`~bnfold.onnx.io.references`: lazy references to bytes on disk, :func:`read_tensor`;
- :mod:`~bnfold.onnx.io.loading`: :func:`load_model`, validation, :func:`check_folded`;
- :mod:`~bnfold.onnx.io.saving`: :func:`save_model`, streaming a model piece by piece;
- atomic writes, output targets and signal handling are :mod:`bnfold.onnx.outputs`.
"""

from __future__ import annotations

from bnfold.onnx.io.loading import LoadedModel, check_folded, load_model
from bnfold.onnx.io.references import has_data_on_disk, is_lazy, read_tensor
from bnfold.onnx.io.saving import PROTOBUF_LIMIT, exceeds_protobuf_limit, save_model
from bnfold.onnx.io.store import DEFAULT_MEMORY_BUDGET, WeightStore, store_of, store_tensor
from bnfold.onnx.io.tensors import (
    EXTERNAL_DATA_ALIGNMENT,
    EXTERNAL_DATA_THRESHOLD,
    MEMORY_LOCATION,
)
from bnfold.onnx.outputs import check_output_path, write_atomically

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
    "WeightStore",
    "store_of",
    "DEFAULT_MEMORY_BUDGET",
    "MEMORY_LOCATION",
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_DATA_ALIGNMENT",
    "PROTOBUF_LIMIT",
]
