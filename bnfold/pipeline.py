"""File to file: what ``bnfold MODEL -o OUT`` does, as one function a pipeline can call.

``fold_file`` loads an ONNX file lazily (large weights stay on disk), makes the original's ONNX
Runtime session, folds in place, optionally simplifies with onnxsim, verifies, and only then writes
the output atomically (unless ``force``), plus the JSON report when asked. A PyTorch source
(``model.pt2`` or ``package.module:factory``) goes through :func:`bnfold.export` instead. The CLI
only parses options, calls this and prints the result, so a pipeline gets exactly what the CLI does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto

from bnfold.errors import BnfoldError, InputSpecError, MissingDependencyError, OutputError
from bnfold.onnx import fold_onnx, load_model, save_model
from bnfold.onnx.io import LoadedModel, check_output_path, write_atomically
from bnfold.report import Report
from bnfold.sources import is_torch_source
from bnfold.verify import VerificationResult, Verifier

if TYPE_CHECKING:  # the torch path is imported only when a PyTorch source is folded
    from bnfold.fx.onnx_export import ExportResult

__all__ = ["FileFoldResult", "fold_file", "check_report_path"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class FileFoldResult:
    """What :func:`fold_file` did: the model it wrote (or would have), its report, the check.

    Shares its shape with :class:`bnfold.fx.ExportResult` (``path``, ``model``, ``report``,
    ``verification``, ``written``, ``passed``, ``to_text``). ``path`` is None for a dry run;
    ``written`` is False when verification failed and ``force`` was not given. For a PyTorch source,
    ``export`` holds the export's own result (the torch fold, the ONNX fold after export).
    """

    source: str
    path: Path | None
    model: ModelProto
    report: Report
    verification: VerificationResult | None
    written: bool
    export: ExportResult | None = None

    @property
    def passed(self) -> bool:
        """Verification passed, or was not run."""
        return self.verification is None or self.verification.passed

    def to_text(self) -> str:
        """The report table, the verification table and what was written, for a terminal."""
        if self.export is not None:
            return self.export.to_text()
        parts = [self.report.to_text()]
        if self.verification is not None:
            parts.append(self.verification.to_text())
        text = "\n\n".join(parts)
        if self.path is not None and self.written:
            text += f"\nwrote {self.path}"
        return text


def fold_file(
    source: PathLike,
    output: PathLike | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    simplify: bool = False,
    skip_rules: Iterable[str] = (),
    rewrite_standalone: bool = False,
    external_data: bool | None = None,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Mapping[str, np.ndarray] | PathLike | None = None,
    seed: int = 0,
    report_path: PathLike | None = None,
    exact: str = "auto",
) -> FileFoldResult:
    """Fold the model at ``source`` and write it to ``output`` once verification passed.

    ``source`` is an ONNX file or a PyTorch source (see :func:`bnfold.load_torch_source`).
    ``output=None`` folds and verifies without writing a model (a dry run). The output is written
    atomically and only when verification passed, unless ``force`` (a failed verification is a result:
    ``result.passed`` False, ``result.written`` False unless forced). ``output`` may be ``source``
    itself: it is then replaced only by a verified fold. ``report_path`` also writes the JSON report.
    The other options are those of :func:`bnfold.fold_onnx` and :func:`bnfold.verify` (``exact``:
    how an output over tolerance is judged);
    ``simplify`` runs onnxsim after folding (``pip install 'bnfold[simplify]'``).
    """
    source_text = os.fspath(source)
    skips = list(skip_rules)
    if report_path is not None:
        check_report_path(report_path, source, output)
    if is_torch_source(source_text):
        result = _fold_torch_source(
            source_text,
            output,
            verify=verify,
            force=force,
            simplify=simplify,
            skip_rules=skips,
            rewrite_standalone=rewrite_standalone,
            external_data=external_data,
            provider=provider,
            atol=atol,
            rtol=rtol,
            input_shapes=input_shapes,
            inputs=inputs,
            exact=exact,
        )
    else:
        result = _fold_onnx_file(
            source_text,
            output,
            verify=verify,
            force=force,
            simplify=simplify,
            skip_rules=skips,
            rewrite_standalone=rewrite_standalone,
            external_data=external_data,
            provider=provider,
            atol=atol,
            rtol=rtol,
            input_shapes=input_shapes,
            inputs=inputs,
            seed=seed,
            exact=exact,
        )
    if report_path is not None:
        write_atomically(report_path, result.report.to_json().encode())
    return result


def _fold_onnx_file(
    source: str,
    output: PathLike | None,
    *,
    verify: bool,
    force: bool,
    simplify: bool,
    skip_rules: list[str],
    rewrite_standalone: bool,
    external_data: bool | None,
    provider: str,
    atol: float | None,
    rtol: float | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    inputs: Mapping[str, np.ndarray] | PathLike | None,
    seed: int,
    exact: str,
) -> FileFoldResult:
    destination = None
    if output is not None:
        destination = check_output_path(output)
        if same_file(source, output) and (not verify or force):
            raise OutputError(
                f"{output}: is the input model, which is only replaced by a verified fold "
                "(drop {verify}/{force}, or write elsewhere)",
                parameters={"verify": "verify=False", "force": "force=True"},
            )
    shapes = {name: list(shape) for name, shape in (input_shapes or {}).items()}
    if simplify:
        _require_onnxsim()

    # Lazily: the large weights stay on disk and are read only when a fold changes them; save_model
    # copies the others from the input file (onnxsim needs them all in memory).
    loaded = load_model(source, lazy=not simplify)
    if destination is not None:
        _check_not_input_data(loaded, source, destination)
    # The original runs (from its file) before the fold, which then edits the loaded model in place;
    # its session is freed before the folded model's is made: one model's worth of memory at a time.
    verifier = None
    if verify:
        with naming(source, when="the original model"):
            verifier = Verifier(
                source, provider=provider, input_shapes=shapes, inputs=inputs, seed=seed, exact=exact
            )
    with naming(source):
        result = fold_onnx(
            loaded.model, skip_rules=skip_rules, inplace=True, rewrite_standalone=rewrite_standalone
        )
    report = result.report
    report.source = source
    folded_model = _simplify(result.model) if simplify else result.model

    verification = None
    if verifier is not None:
        with naming(source, when="the original model"):
            verification = verifier.compare(folded_model, atol=atol, rtol=rtol)
        del verifier
        report.extras["verification"] = verification.to_dict()

    passed = verification is None or verification.passed
    written = False
    if destination is not None:
        if passed or force:
            use_external = loaded.used_external_data if external_data is None else external_data
            save_model(folded_model, destination, external_data=use_external or None)
            written = True
        report.extras["output"] = str(output) if written else None
    return FileFoldResult(source, destination, folded_model, report, verification, written)


def _fold_torch_source(
    source: str,
    output: PathLike | None,
    *,
    inputs: Mapping[str, np.ndarray] | PathLike | None,
    simplify: bool,
    input_shapes: Mapping[str, Sequence[int]] | None,
    **options: Any,
) -> FileFoldResult:
    """Load a PyTorch model and run ``bnfold.export`` on it (fold in torch, export, fold, verify)."""
    if inputs is not None or simplify:
        parameter = "inputs" if inputs is not None else "simplify"
        raise InputSpecError(
            f"{{{parameter}}} works on ONNX models only; a PyTorch model uses random inputs",
            parameters=(parameter,),
        )
    try:
        from bnfold.fx import export, load_torch_source
    except ImportError as error:
        if error.name is None or not error.name.startswith("torch"):
            raise
        message = f"{source}: a PyTorch model needs torch: pip install 'bnfold[torch]'"
        raise MissingDependencyError(message) from None
    if output is not None:
        check_output_path(output)
        if same_file(source, output):
            raise OutputError(f"{output}: is the input model; write the ONNX file elsewhere")
    shapes = {name: list(shape) for name, shape in (input_shapes or {}).items()}
    module, example_inputs = load_torch_source(source, shapes or None)
    exported = export(module, example_inputs, output, **options)
    exported.report.source = source
    return FileFoldResult(
        source,
        exported.path,
        exported.model,
        exported.report,
        exported.verification,
        exported.written,
        export=exported,
    )


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file (the same path, or hard links)."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_not_input_data(loaded: LoadedModel, source: PathLike, output: Path) -> None:
    """Refuse an output (or its .data file) that would overwrite the input's external data.

    Folding in place replaces the model and its data together, so that one case is allowed.
    """
    if not loaded.external_files:
        return
    targets = [output, output.with_name(output.name + ".data")]
    for target in targets:
        if target.resolve() in loaded.external_files and not same_file(source, output):
            raise OutputError(f"{output}: would overwrite {target}, which holds the weights of {source}")


def check_report_path(report_path: PathLike, *models: PathLike | None) -> None:
    """Fail early when the JSON report cannot be written, or would overwrite a model."""
    target = check_output_path(report_path).resolve()
    for model in models:
        if model is not None and Path(model).resolve() == target:
            raise OutputError(
                f"{report_path}: {{report_path}} would overwrite the model {model}",
                parameters=("report_path",),
            )


@contextlib.contextmanager
def naming(model: PathLike, *, when: str = "") -> Iterator[None]:
    """Put the model's path in front of errors about it: every error of the fold, and those of the
    verifier that say ``when`` ("the original model": one ONNX Runtime cannot load or run)."""
    try:
        yield
    except BnfoldError as error:
        if when not in str(error) or str(error).startswith(f"{model}: "):
            raise
        raise error.prefixed(f"{model}: ") from None


def _require_onnxsim() -> None:
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "{simplify} needs onnxsim: pip install 'bnfold[simplify]'", parameters=("simplify",)
        ) from None


def _simplify(model: ModelProto) -> ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise BnfoldError(
            "onnxsim could not validate its simplified model; fold without {simplify}",
            parameters=("simplify",),
        )
    return simplified
