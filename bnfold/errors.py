"""Exceptions that carry a one-line message a user can act on.

A :class:`BnfoldError` is a *user* error (bad file, bad option, missing dependency): the CLI prints its
message on one line and exits 2. A verification mismatch is not an exception but a result value.
"""

from __future__ import annotations

__all__ = [
    "BnfoldError",
    "ModelLoadError",
    "InputSpecError",
    "ProviderUnavailableError",
    "MissingDependencyError",
    "OutputError",
]


class BnfoldError(Exception):
    """Base class for errors caused by the user's input or environment (CLI exit code 2)."""


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
