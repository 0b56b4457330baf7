"""Exceptions that carry a one-line message a user can act on.

A :class:`BnfoldError` is a *user* error (bad file, bad option, missing dependency): the CLI prints its
message on one line and exits 2. A verification mismatch is not an exception but a result value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "BnfoldError",
    "ModelLoadError",
    "InputSpecError",
    "ProviderUnavailableError",
    "MissingDependencyError",
    "OutputError",
    "OutputWriteError",
    "InternalError",
    "FoldedModelRejectedError",
]


class BnfoldError(Exception):
    """Base class for errors caused by the user's input or environment (CLI exit code 2).

    A message may name the option at fault as ``{key}``, with ``parameters`` giving each key's
    Python spelling (``{"verify": "verify=False"}``; a bare key stands for itself): ``str(error)``
    names the API parameter, and the CLI rewords it with its flags (:meth:`worded`), so each caller
    reads the names it typed.
    """

    def __init__(self, message: str = "", *, parameters: Mapping[str, str] | Iterable[str] = ()) -> None:
        spellings = dict(parameters) if isinstance(parameters, Mapping) else {key: key for key in parameters}
        self.template = message
        self.parameters = spellings
        super().__init__(_fill(message, spellings))

    def worded(self, spellings: Mapping[str, str]) -> str:
        """The message with each named option spelled as in ``spellings`` (e.g. CLI flags)."""
        return _fill(
            self.template, {key: spellings.get(key, value) for key, value in self.parameters.items()}
        )

    def prefixed(self, prefix: str) -> BnfoldError:
        """The same error, its message led by ``prefix`` (a file name)."""
        error = type(self)(prefix + self.template, parameters=self.parameters)
        return error


def _fill(template: str, spellings: Mapping[str, str]) -> str:
    for key, spelling in spellings.items():
        template = template.replace("{" + key + "}", spelling)
    return template


class ModelLoadError(BnfoldError):
    """The model file is missing, unreadable, not ONNX, or not a valid ONNX model."""


class InputSpecError(BnfoldError):
    """``--input-shape`` / ``--inputs`` do not fit the model's inputs."""


class ProviderUnavailableError(BnfoldError):
    """An ONNX Runtime execution provider was asked for but cannot be used here."""


class MissingDependencyError(BnfoldError):
    """An optional dependency (torch, onnxsim) is needed for the requested feature."""


class OutputError(BnfoldError):
    """The output path cannot be written (missing directory, not writable, ...)."""


class OutputWriteError(OutputError, OSError):
    """Writing an output failed in the operating system (a full disk, a quota, an I/O error).

    Also an ``OSError`` (with ``errno``), for callers that catch those; its message names the path.
    """

    def __init__(
        self,
        message: str = "",
        *,
        parameters: Mapping[str, str] | Iterable[str] = (),
        errno: int | None = None,
    ) -> None:
        super().__init__(message, parameters=parameters)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InternalError(Exception):
    """A bug in bnfold, caught before it could do harm (e.g. a fold that made the model invalid:
    the model is not written). Not a :class:`BnfoldError`: the CLI exits 3."""


class FoldedModelRejectedError(BnfoldError):
    """ONNX Runtime refused the folded model (cannot load it, or its inputs/outputs differ).

    From ``bnfold verify`` the folded file is the user's (exit 2); from a fold, where the original
    loaded and ran, it is bnfold's bug, and the fold pipeline turns it into an :class:`InternalError`.
    """
