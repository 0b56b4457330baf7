"""The ``bnfold`` command's entry point: answers Ctrl-C (and SIGTERM, SIGHUP) while bnfold starts.

Importing the CLI imports onnx, numpy and ONNX Runtime's bindings (a second or more on a cold
cache); an interrupt then would print Python's traceback. This module imports nothing heavy (nor
does ``import bnfold``) and, until the CLI installs its own handlers (``bnfold.cli.main``: they
remove temporary files on the way out), answers those signals by exiting at once, 128 + the signal
number, with one line. Exiting from the handler itself (not raising into whatever code was running)
is what makes it one line at any moment: an exception raised inside an import-lock callback or a
finalizer would be printed by Python as "Exception ignored" with a traceback. Nothing has been
written before the CLI's handlers are in place, so there is nothing to clean up.
"""

from __future__ import annotations

import os
import signal

__all__ = ["main"]

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop(signum: int, frame: object) -> None:
    message = f"bnfold: interrupted ({signal.Signals(signum).name}) while starting; nothing written\n"
    os.write(2, message.encode())
    os._exit(128 + signum)


def main() -> None:
    """Run ``bnfold`` (:func:`bnfold.cli.main`), exiting in one line if stopped while starting."""
    for signum in _SIGNALS:
        signal.signal(signum, _stop)
    from bnfold.cli import main as run_cli

    run_cli()


if __name__ == "__main__":  # python -m bnfold.console
    main()
