"""Where an output goes, and writing it there without ever leaving half of it or replacing the wrong file.

An output path is resolved once, before any work, into an :class:`OutputTarget`:

- a regular file (or a name that does not exist yet) is written to a temporary file beside it,
  fsynced, and renamed over it only once complete — a reader, or an interrupted run, sees the old
  file or the new one;
- a symbolic link (a chain of them, or one whose target does not exist yet) is written *through*:
  the temporary file is made in the directory of the file the link points to and renamed over that
  file, so the link stays a link and still names the new content;
- ``-`` is standard output, and a character device, a FIFO or a Unix socket is written to directly
  (never replaced by a regular file: ``-o /dev/null`` as root must not delete the device node);
- a directory, a block device or a link loop is refused.

Interrupts (SIGINT, SIGTERM, SIGHUP) are held back while a temporary file is created and while
outputs are renamed, so that every temporary file is known by name (and removed on the way out) and
a model and its data file are renamed together. Concurrent bnfold writers of one directory take an
exclusive lock on the directory for their renames, so two processes writing the same output never
pair one's model with the other's data. Any OS error while writing (a full disk, a quota) is an
:class:`~bnfold.errors.OutputWriteError` that names the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bnfold.errors import OutputError, OutputWriteError

__all__ = [
    "STDOUT",
    "OutputTarget",
    "output_target",
    "check_output_path",
    "commit",
    "commit_pair",
    "write_atomically",
    "signals_held",
    "check_disjoint",
    "same_path",
    "write_error",
    "StreamDigest",
    "stream_digest",
]

STDOUT = "-"
HELD_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@dataclass(frozen=True)
class OutputTarget:
    """A resolved output: ``path`` as the user gave it, ``real`` the file that will hold the bytes
    (symbolic links followed), and ``kind``: ``"file"`` (replaced atomically), ``"stream"`` (a
    device, FIFO or socket, written directly) or ``"stdout"``."""

    path: Path
    real: Path
    kind: str

    @property
    def atomic(self) -> bool:
        return self.kind == "file"


def output_target(path: str | os.PathLike) -> OutputTarget:
    """Resolve ``path`` (see the module docstring); raise :class:`OutputError` when it cannot be written."""
    if str(path) == STDOUT:
        return OutputTarget(Path(STDOUT), Path(STDOUT), "stdout")
    given = Path(path)
    if "\0" in str(given):
        raise OutputError(f"{given!s}: the path contains a NUL byte")
    real = given
    if given.is_symlink():
        try:
            os.stat(given)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OutputError(f"{given}: is a loop of symbolic links") from None
            if error.errno != errno.ENOENT:
                raise OutputError(f"{given}: cannot follow the symbolic link ({error.strerror})") from None
        real = Path(os.path.realpath(given))  # a dangling link: the file it would create
    try:
        status = os.stat(real)
    except FileNotFoundError:
        status = None
    except OSError as error:
        raise OutputError(f"{given}: cannot be written ({error.strerror})") from None
    if status is not None and not stat.S_ISREG(status.st_mode):
        mode = status.st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{given}: is a directory, expected an output file name")
        if stat.S_ISBLK(mode):
            raise OutputError(f"{given}: is a block device; bnfold does not write onto disks")
        if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise OutputError(f"{given}: is not a regular file, device, FIFO or socket")
        if not stat.S_ISSOCK(mode) and not os.access(real, os.W_OK):
            raise OutputError(f"{given}: is not writable")
        return OutputTarget(given, real, "stream")
    directory = real.parent if str(real.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{given}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{given}: directory {directory} is not writable")
    return OutputTarget(given, real, "file")


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be written; the path as given."""
    return output_target(path).path


def write_error(path: str | os.PathLike, error: OSError) -> OutputWriteError:
    """An :class:`OutputWriteError` for an OS error while writing ``path`` (a full disk named as one)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        message = f"{path}: {what} while writing it ({error.strerror}); free space or write elsewhere"
    elif error.errno == errno.EFBIG:
        message = f"{path}: file too large for its file system ({error.strerror})"
    else:
        message = f"{path}: cannot write ({error.strerror or error})"
    return OutputWriteError(message, errno=error.errno)


Writer = Callable[[BinaryIO], None]


@dataclass
class StreamDigest:
    """The size and SHA-256 of the bytes written to stream outputs (see :func:`stream_digest`)."""

    size: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()


_STREAM_DIGESTS: ContextVar[tuple[StreamDigest, ...]] = ContextVar("bnfold_stream_digests", default=())


@contextlib.contextmanager
def stream_digest() -> Iterator[StreamDigest]:
    """Hash, as they are written, the bytes this block writes to a stream output (standard output, a
    device, a FIFO, a socket): they cannot be read back afterwards, and the report lists the digest
    of what was written. Files written atomically are not included (hash them once written)."""
    digest = StreamDigest()
    token = _STREAM_DIGESTS.set((*_STREAM_DIGESTS.get(), digest))
    try:
        yield digest
    finally:
        _STREAM_DIGESTS.reset(token)


class _HashingHandle:
    """An unbuffered binary handle that also feeds what it wrote to digests. It has no ``fileno``,
    so writers copy through ``write`` (every byte is seen) rather than with ``copy_file_range``."""

    def __init__(self, handle: BinaryIO, digests: tuple[StreamDigest, ...]) -> None:
        self._handle = handle
        self._digests = digests

    def write(self, data: bytes | memoryview) -> int | None:
        count = self._handle.write(data)
        if count:
            written = memoryview(data)[:count]
            for digest in self._digests:
                digest.hasher.update(written)
                digest.size += len(written)
        return count


def commit(target: OutputTarget, write: Writer, *, stale: Callable[[], Path | None] | None = None) -> None:
    """Write an output with ``write(handle)`` (an unbuffered binary file) to ``target``.

    A regular file is written beside its real path and renamed over it; ``stale``, called under the
    directory lock just before the rename, may name a file to remove after it (a data file only the
    replaced output used). Streams are written directly.
    """
    if not target.atomic:
        _stream(target, write)
        return
    temporary = None
    try:
        temporary = _write_temporary(target.real, write)
        with signals_held(), _directory_locked(target.real.parent):
            obsolete = stale() if stale is not None else None
            os.replace(temporary, target.real)
            temporary = None
            if obsolete is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(obsolete)
    except OSError as error:
        raise write_error(target.path, error) from None
    finally:
        _remove(temporary)


def commit_pair(
    target: OutputTarget, data: Path, write_data: Writer, write_model: Callable[[], Writer]
) -> None:
    """Write a model and its external-data file ``data`` as a pair: both to temporary files first,
    then renamed data first, model second, under the directory lock and with interrupts held, so
    that no reader or concurrent writer ever sees the model with another write's data (``write_model``
    is asked for the model's writer once the data is written)."""
    data_temporary = model_temporary = None
    current = data
    try:
        data_temporary = _write_temporary(data, write_data)
        current = target.path
        model_temporary = _write_temporary(target.real, write_model())
        with signals_held(), _directory_locked(target.real.parent):
            os.replace(data_temporary, data)
            data_temporary = None
            os.replace(model_temporary, target.real)
            model_temporary = None
    except OSError as error:
        raise write_error(current, error) from None
    finally:
        _remove(data_temporary)
        _remove(model_temporary)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (see :func:`commit`): atomically for a file, directly for a stream."""

    def write(handle: BinaryIO) -> None:
        write_all(handle, data)

    commit(output_target(path), write)


def write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    """Write all of ``data`` to an unbuffered file (one write may take only part of it)."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += handle.write(view[written:])


def _write_temporary(path: Path, write: Writer) -> str:
    """A complete, fsynced temporary file beside ``path`` written by ``write``, with ``path``'s mode."""
    temporary = None
    try:
        with signals_held():  # an interrupt lands once the name is known, so the file is removed
            descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(descriptor, "wb", buffering=0) as handle:
            write(handle)
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(path))
    except BaseException:
        _remove(temporary)
        raise
    return temporary


def _stream(target: OutputTarget, write: Writer) -> None:
    """Write to standard output, a device, a FIFO or a socket directly (there is nothing to rename)."""
    digests = _STREAM_DIGESTS.get()
    if digests:
        unwrapped = write

        def write(handle: BinaryIO) -> None:
            unwrapped(_HashingHandle(handle, digests))  # type: ignore[arg-type]

    try:
        if target.kind == "stdout":
            sys.stdout.flush()
            try:
                descriptor = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):  # replaced by a non-file (a test runner)
                write(sys.stdout.buffer)
                sys.stdout.flush()
                return
            with open(descriptor, "wb", buffering=0, closefd=False) as handle:
                write(handle)
            return
        if stat.S_ISSOCK(os.stat(target.real).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(str(target.real))
                with connection.makefile("wb", buffering=0) as handle:
                    write(handle)
            return
        with open(target.real, "wb", buffering=0) as handle:
            write(handle)
    except BrokenPipeError:
        raise OutputWriteError(f"{target.path}: the reader closed the pipe", errno=errno.EPIPE) from None
    except OSError as error:
        raise write_error(target.path, error) from None


def _remove(temporary: str | None) -> None:
    if temporary is not None:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


@contextlib.contextmanager
def _directory_locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (bnfold writers of one directory take turns renaming).

    A directory that cannot be opened for reading is written without the lock.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block is done, then deliver them.

    Only the main thread can install handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in HELD_SIGNALS:
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
    """The mode a plain write would give ``path``: its current permission bits (never setuid, setgid
    or sticky: a rewritten file must not gain privileges it was given for other content), else
    0o666 less the umask. (mkstemp creates its files 0o600.)"""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode) & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# -- paths written against paths read ----------------------------------------------------------------
def same_path(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file: the same resolved path (symlinks followed, for files
    that do not exist yet too), or the same inode (hard links)."""
    if STDOUT in (str(first), str(second)):
        return False
    try:
        if os.path.realpath(first) == os.path.realpath(second):
            return True
        return os.path.samefile(first, second)
    except (OSError, ValueError):
        return False


def _is_regular_or_missing(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return True


def check_disjoint(
    writes: Iterable[tuple[str, str, str | os.PathLike | None]],
    reads: Iterable[tuple[str, str | os.PathLike | None]],
) -> None:
    """Refuse to write any file that is read, or to write one file twice.

    ``writes`` are (option, what it writes, path) triples, e.g. ``("--report", "the report",
    "r.json")``; ``reads`` are (what it is, path) pairs, e.g. ``("the model", "m.onnx")``. None paths
    are skipped. Devices, FIFOs and standard output are streams, not files that could be
    overwritten: they are never compared.
    """
    written = [
        (option, noun, path)
        for option, noun, path in writes
        if path is not None and _is_regular_or_missing(path)
    ]
    read = [(label, path) for label, path in reads if path is not None]
    for position, (option, noun, path) in enumerate(written):
        for read_label, read_path in read:
            if same_path(path, read_path):
                raise OutputError(
                    f"{path}: {option} would overwrite {read_label} {read_path}; write elsewhere"
                )
        for other_option, _, other in written[position + 1 :]:
            if same_path(path, other):
                raise OutputError(
                    f"{other}: {other_option} would overwrite {noun} ({option}); write them apart"
                )
