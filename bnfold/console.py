"""The ``bnfold`` command's entry point: answers Ctrl-C (and SIGTERM, SIGHUP) while bnfold starts.

Importing the CLI imports onnx, numpy and ONNX Runtime's bindings (a second or more on a cold
cache); an interrupt then would print Python's traceback. This module imports nothing heavy (nor
does ``import bnfold``), handles those signals until the CLI installs its own (``bnfold.cli.main``:
they remove temporary files on the way out), and exits 128 + the signal number with one line.
"""

from __future__ import annotations

import signal
import sys

__all__ = ["main"]

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _Stopped(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_RECEIVED: list[int] = []


def _stop(signum: int, frame: object) -> None:
    _RECEIVED.append(signum)
    raise _Stopped(signum)


def main() -> None:
    """Run ``bnfold`` (:func:`bnfold.cli.main`), exiting in one line if stopped while starting."""
    for signum in _SIGNALS:
        signal.signal(signum, _stop)
    try:
        from bnfold.cli import main as run_cli
    except KeyboardInterrupt as interrupt:
        _exit_stopped(getattr(interrupt, "signum", signal.SIGINT))
    except Exception:
        if not _RECEIVED:  # a broken installation: Python's own report says what is missing
            raise
        _exit_stopped(_RECEIVED[-1])  # an interrupt a library turned into another exception
    try:
        run_cli()
    except _Stopped as stopped:  # landed before the CLI installed its own handlers
        _exit_stopped(stopped.signum)


def _exit_stopped(signum: int) -> None:
    for each in _SIGNALS:  # a second Ctrl-C must not interrupt the goodbye
        signal.signal(each, signal.SIG_IGN)
    sys.stderr.write(f"bnfold: interrupted ({signal.Signals(signum).name}) while starting; nothing written\n")
    sys.exit(128 + signum)
