"""Progress of the steps of a fold (loading, folding, verifying, saving), for whoever is watching.

Library code names its steps through a :class:`Progress` the caller hands in; it never prints. Every
step is also logged at DEBUG level (``bnfold -v``). :class:`TerminalProgress` is what the CLI uses
when stderr is a terminal: a step that is still running after ``delay`` seconds gets a line, and the
line gets the elapsed time when the step ends, so quick folds print nothing extra.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol, TextIO

__all__ = ["Progress", "NoProgress", "TerminalProgress", "step"]

logger = logging.getLogger(__name__)


class Progress(Protocol):
    def step(self, text: str) -> contextlib.AbstractContextManager[None]:
        """A context manager around one step; ``text`` says what it does (``loading model.onnx``)."""
        ...


class NoProgress:
    """Shows nothing (the default of the API)."""

    def step(self, text: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class TerminalProgress:
    """Lines on ``stream`` (a terminal) for steps that take longer than ``delay`` seconds."""

    def __init__(self, stream: TextIO, *, delay: float = 1.0) -> None:
        self.stream = stream
        self.delay = delay
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        started = time.monotonic()
        shown, finished = threading.Event(), threading.Event()

        def show() -> None:
            with self._lock:
                if finished.is_set():
                    return
                self.stream.write(f"bnfold: {text} ...")
                self.stream.flush()
                shown.set()

        timer = threading.Timer(self.delay, show)
        timer.daemon = True
        timer.start()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            timer.cancel()
            with self._lock:
                finished.set()
                if shown.is_set():
                    self.stream.write(f" {outcome} in {time.monotonic() - started:.1f} s\n")
                    self.stream.flush()


@contextlib.contextmanager
def step(progress: Progress | None, text: str) -> Iterator[None]:
    """Run one step under ``progress`` (None: nothing shown) and log its start and duration."""
    logger.debug("%s", text)
    started = time.monotonic()
    with progress.step(text) if progress is not None else contextlib.nullcontext():
        yield
    logger.debug("%s: %.2f s", text, time.monotonic() - started)
