"""Inputs bnfold reads or makes for verification, checked against memory before anything is allocated.

An ``--inputs`` file is a user's file: it may be empty, truncated, a single ``.npy``, a zip whose
entries claim shapes of terabytes, or a compression bomb. :func:`read_npz` reads every entry's
``.npy`` header first and refuses, in one line, an archive whose arrays do not match their entries'
sizes or would not fit in the memory available, before any array is allocated (object arrays are
refused: no pickle is ever loaded). :func:`check_random_input` does the same for the random inputs
that verification draws for a model's declared shape (drawn in float64, then cast).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bnfold.errors import InputSpecError

__all__ = ["read_npz", "read_inputs_file", "check_random_input", "available_memory"]

NPY_MAGIC = b"\x93NUMPY"


def available_memory() -> int | None:
    """Bytes this process can still allocate: the system's available memory, within the cgroup's
    limit when there is one; None when neither can be read."""
    candidates = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            candidates.append(max(int(limit) - int(used), 0))
    except (OSError, ValueError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(candidates)


def _gigabytes(size: int) -> str:
    return f"{size / 2**30:.3g} GB"


def check_random_input(name: str, shape: list[int], dtype: np.dtype, *, fixed: bool) -> None:
    """Refuse (:class:`InputSpecError`) to draw a random input that would not fit in memory.

    Verification draws each input in float64 and casts it (two arrays at once), and keeps the
    inputs of two runs; ``fixed`` says the model's declared shape fixes the size (no
    ``--input-shape`` can make it smaller).
    """
    count = math.prod(shape)
    needed = count * (8 + 2 * np.dtype(dtype).itemsize)
    available = available_memory()
    if available is None or needed <= available:
        return
    shape_text = "x".join(map(str, shape))
    advice = (
        "the model fixes that shape: verify with real data (--inputs) on a machine with more memory, "
        "or skip verification with --no-verify"
        if fixed
        else "pass --input-shape with smaller dynamic dimensions, or real data with --inputs"
    )
    raise InputSpecError(
        f"input {name!r} of shape {shape_text} needs {_gigabytes(needed)} of random data to verify, more "
        f"than the {_gigabytes(available)} of memory available; {advice}"
    )


def read_inputs_file(path: str | os.PathLike, input_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays by input name from an ``.npz`` (one array per input name) or, for a model with one
    input, an ``.npy`` (that input's array); sizes checked before reading, never unpickled."""
    path = Path(path)
    if _starts_with(path, NPY_MAGIC):
        if len(input_names) != 1:
            raise InputSpecError(
                f"{path}: one array (.npy) for a model with {len(input_names)} inputs "
                f"({', '.join(input_names)}); pass an .npz with one array per input name"
            )
        return {input_names[0]: _read_npy(path)}
    return read_npz(path)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, by name; every problem is an :class:`InputSpecError` naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise InputSpecError(f"{path}: is a directory, expected an .npz file")
        with open(path, "rb") as handle:
            start = handle.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise InputSpecError(f"{path}: no such file") from None
    except OSError as error:
        raise InputSpecError(f"{path}: cannot read ({error.strerror})") from None
    if size == 0:
        raise InputSpecError(f"{path}: file is empty (expected an .npz archive of the model's inputs)")
    if start == NPY_MAGIC:
        raise InputSpecError(
            f"{path}: a single .npy array, not an .npz archive; save the inputs by name with "
            "numpy.savez(path, input_name=array, ...)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            entries = _checked_entries(path, archive)
            arrays = {}
            for name, info in entries:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except InputSpecError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as error:
        raise InputSpecError(f"{path}: not a readable .npz file ({error or type(error).__name__})") from None
    except (OSError, ValueError, NotImplementedError, RuntimeError, MemoryError) as error:
        raise InputSpecError(f"{path}: not a readable .npz file ({error or type(error).__name__})") from None


def _checked_entries(path: Path, archive: zipfile.ZipFile) -> list[tuple[str, zipfile.ZipInfo]]:
    """(name, entry) for every array, after checking each entry's header against its size and the
    total against the memory available. A zip entry never yields more than its declared size (and
    its checksum is verified), so the declared sizes bound what reading can allocate."""
    entries = []
    names = set()
    total = 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise InputSpecError(f"{path}: entry {info.filename!r} is not an .npy array")
        name = info.filename[: -len(".npy")]
        if name in names:
            raise InputSpecError(f"{path}: array {name!r} is stored twice")
        names.add(name)
        with archive.open(info) as member:
            shape, dtype, header_size = _npy_header(path, member, f"array {name!r}")
        claimed = math.prod(shape) * dtype.itemsize
        if claimed != info.file_size - header_size:
            raise InputSpecError(
                f"{path}: array {name!r} claims shape {list(shape)} ({claimed} bytes) but its entry holds "
                f"{info.file_size - header_size} bytes (truncated or forged)"
            )
        total += claimed
        entries.append((name, info))
    _check_memory(path, total)
    return entries


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False  # read_npz says what is wrong


def _read_npy(path: Path) -> np.ndarray:
    """One ``.npy`` file, its header checked against the file's size and the memory available."""
    try:
        with open(path, "rb") as handle:
            shape, dtype, header_size = _npy_header(path, handle, "the array")
            claimed = math.prod(shape) * dtype.itemsize
            size = os.fstat(handle.fileno()).st_size
            if claimed != size - header_size:
                raise InputSpecError(
                    f"{path}: claims shape {list(shape)} ({claimed} bytes) but holds {size - header_size} "
                    "bytes (truncated or forged)"
                )
            _check_memory(path, claimed)
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False)
    except InputSpecError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as error:
        raise InputSpecError(f"{path}: not a readable .npy file ({error or type(error).__name__})") from None


def _npy_header(path: Path, handle, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header size) of the ``.npy`` stream at ``handle``; object arrays refused."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    if dtype.hasobject:
        kind = ".npz" if what.startswith("array") else ".npy"
        raise InputSpecError(
            f"{path}: not a readable {kind} file: {what} holds Python objects (a pickle); bnfold reads "
            "only numbers"
        )
    return shape, dtype, handle.tell()


def _check_memory(path: Path, total: int) -> None:
    available = available_memory()
    if available is not None and total > available:
        raise InputSpecError(
            f"{path}: its arrays take {_gigabytes(total)} unpacked, more than the {_gigabytes(available)} "
            "of memory available"
        )
