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
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from onnx import ModelProto

from bnfold.errors import (
    BnfoldError,
    FoldedModelRejectedError,
    InputSpecError,
    InternalError,
    MissingDependencyError,
    OutputError,
)
from bnfold.latency import Latency, measure_latency
from bnfold.onnx import fold_onnx, load_model, save_model
from bnfold.onnx.io import WeightStore, check_folded, check_output_path, write_atomically
from bnfold.onnx.outputs import STDOUT, check_disjoint, output_target, same_path, stream_digest
from bnfold.progress import Progress, step
from bnfold.provenance import record_provenance, record_source
from bnfold.report import Report
from bnfold.simplify import account_for_simplify, require_onnxsim
from bnfold.simplify import simplify as onnxsim_simplify
from bnfold.sources import is_torch_source
from bnfold.stats import FileInfo, ModelStats, comparison_table, file_info, model_stats
from bnfold.verify import VerificationResult, Verifier
from bnfold.version import __version__

if TYPE_CHECKING:  # the torch path is imported only when a PyTorch source is folded
    from bnfold.fx.onnx_export import ExportResult

__all__ = ["FileFoldResult", "PipelineResult", "fold_file", "check_report_path", "check_paths"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class PipelineResult(Protocol):
    """What a file pipeline returns, whatever the source: :class:`FileFoldResult` (``fold_file``) and
    :class:`bnfold.fx.ExportResult` (``bnfold.export``) both have this shape."""

    @property
    def path(self) -> Path | None: ...
    @property
    def model(self) -> ModelProto: ...
    @property
    def report(self) -> Report: ...
    @property
    def verification(self) -> VerificationResult | None: ...
    @property
    def written(self) -> bool: ...
    @property
    def passed(self) -> bool: ...
    def to_text(self) -> str: ...


@dataclass
class FileFoldResult:
    """What :func:`fold_file` did: the model it wrote (or would have), its report, the check.

    Shares its shape with :class:`bnfold.fx.ExportResult` (``path``, ``model``, ``report``,
    ``verification``, ``written``, ``passed``, ``to_text``). ``path`` is None for a dry run;
    ``written`` is False when verification failed and ``force`` was not given. ``before``/``after``
    are the operator counts, parameter bytes and files of the source and of the written model
    (``before`` is None for a PyTorch source). For a PyTorch source, ``export`` holds the export's own
    result (the torch fold, the ONNX fold after export).
    """

    source: str
    path: Path | None
    model: ModelProto
    report: Report
    verification: VerificationResult | None
    written: bool
    source_files: list[FileInfo] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    latency: Latency | None = None
    export: ExportResult | None = None
    # Where the new weights of a lazily folded model live (see bnfold.WeightStore): ``model`` can be
    # read and saved while this result (or the store given to fold_file) is held.
    store: WeightStore | None = None

    @property
    def passed(self) -> bool:
        """Verification passed, or was not run."""
        return self.verification is None or self.verification.passed

    def to_text(self, *, operators: bool = True) -> str:
        """The report, the verification, the before/after table (unless ``operators=False``) and what
        was written, for a terminal."""
        if self.export is not None:
            parts = [self.export.to_text()]
        else:
            parts = [self.report.to_text()]
            if self.verification is not None:
                parts.append(self.verification.to_text())
        if self.after is not None and operators:
            parts.append(comparison_table(self.before, self.after))
        if self.latency is not None:
            parts.append(self.latency.to_text())
        text = "\n\n".join(parts)
        if self.path is not None:
            text += f"\nwrote {self.path}" if self.written else f"\ndid not write {self.path}"
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
    benchmark_runs: int = 0,
    digest_output: bool | None = None,
    progress: Progress | None = None,
    trust_code: bool = False,
    store: WeightStore | None = None,
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

    The written model carries provenance (``bnfold.*`` metadata, a doc string line on every node
    that absorbed something; :mod:`bnfold.provenance`). ``benchmark_runs=N`` also times the source and
    the written model in ONNX Runtime at its default optimization level (median of N runs after a
    warm-up). ``digest_output`` hashes the written files for the report (default: when
    ``report_path`` is given). ``progress`` is told about each step (see :mod:`bnfold.progress`).

    ``output`` and ``report_path`` may be ``-`` (standard output; not both); no path written may be
    one that is read (:func:`check_paths`). ``trust_code`` allows a ``.pt2`` source, whose loading
    can run code from the file.

    An ONNX source is loaded lazily (its large weights stay on disk); new weights go to ``store``
    (a :class:`bnfold.WeightStore` the caller owns, e.g. one per service with its own memory
    budget) or to a store of the result's own (``result.store``), released with the result.
    """
    source_text = os.fspath(source)
    skips = list(skip_rules)
    if benchmark_runs < 0:
        raise InputSpecError("{benchmark_runs} must be >= 0", parameters=("benchmark_runs",))
    inputs_path = None if isinstance(inputs, Mapping) else inputs
    check_paths(source_text, output, report_path, inputs_path, external_data)
    if benchmark_runs and is_torch_source(source_text):
        raise InputSpecError(
            "{benchmark_runs} times ONNX models only (a PyTorch source has no ONNX model before the fold)",
            parameters=("benchmark_runs",),
        )
    digest = bool(digest_output or (digest_output is None and report_path is not None))
    options = dict(
        digest_output=digest,
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
        progress=progress,
    )
    if is_torch_source(source_text):
        result = _fold_torch_source(source_text, output, trust_code=trust_code, **options)
    else:
        result = _fold_onnx_file(
            source_text, output, seed=seed, report_path=report_path, store=store, **options
        )
    after_files = result.after.files if result.after else []
    if result.written and digest and any(not info.sha256 for info in after_files):
        with step(progress, "hashing the written files"):  # (a stream was hashed as it was written)
            after_files[:] = [info if info.sha256 else file_info(info.path) for info in after_files]
    if benchmark_runs:
        with step(progress, f"timing both models in ONNX Runtime ({benchmark_runs} runs each)"):
            result.latency = _time_both(source_text, result, inputs, benchmark_runs)
    _describe(result)
    if report_path is not None:
        write_atomically(report_path, result.report.to_json().encode())
    return result


def _time_both(
    source: str, result: FileFoldResult, inputs: Mapping[str, np.ndarray] | PathLike | None, runs: int
) -> Latency:
    """Time the source file and the written one (a model not written is saved to a temporary folder)."""
    if result.written and result.path is not None and os.fspath(result.path) != STDOUT:
        return measure_latency(source, result.path, result.verification, inputs=inputs, runs=runs)
    with tempfile.TemporaryDirectory(prefix="bnfold-benchmark-") as directory:
        folded = Path(directory) / "folded.onnx"
        save_model(result.model, folded)
        return measure_latency(source, folded, result.verification, inputs=inputs, runs=runs)


def _describe(result: FileFoldResult) -> None:
    """Put version, files, counts and timings into the report's JSON (``report.extras``)."""
    extras = result.report.extras
    extras["bnfold_version"] = __version__
    extras["inputs"] = [info.to_dict() for info in result.source_files]
    extras["outputs"] = [info.to_dict() for info in result.after.files] if result.after else []
    extras["model"] = {
        "before": result.before.to_dict() if result.before else None,
        "after": result.after.to_dict() if result.after else None,
    }
    if result.latency is not None:
        extras["latency"] = result.latency.to_dict()
    if result.store is not None:  # a lazy fold: where its new weights were kept
        extras["new_weights"] = {
            "memory_budget_bytes": result.store.memory_budget,
            "in_memory_bytes": result.store.memory_bytes,
            "spilled_bytes": result.store.spill_bytes,
        }


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
    progress: Progress | None,
    digest_output: bool,
    report_path: PathLike | None = None,
    store: WeightStore | None = None,
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
        require_onnxsim()

    # Lazily: the large weights stay on disk and are read only when a fold changes them; save_model
    # copies the others from the input file (onnxsim needs them all in memory).
    with step(progress, f"loading {source}"):
        loaded = load_model(source, lazy=not simplify, store=store)
    inputs_path = None if isinstance(inputs, Mapping) else inputs
    check_paths(source, output, report_path, inputs_path, external_data, loaded.external_files)
    # The source's digest (for the report and the provenance metadata) is computed beside the work.
    digests = _Digests([loaded.path, *loaded.external_files])
    before = model_stats(loaded.model)
    # The original runs (from its file) before the fold, which then edits the loaded model in place;
    # its session is freed before the folded model's is made: one model's worth of memory at a time.
    verifier = None
    if verify:
        with naming(source, when="the original model"):  # (its session and each run are steps)
            verifier = Verifier(
                source,
                provider=provider,
                input_shapes=shapes,
                inputs=inputs,
                seed=seed,
                exact=exact,
                progress=progress,
            )
    with step(progress, "folding"), naming(source):
        result = fold_onnx(
            loaded.model,
            skip_rules=skip_rules,
            inplace=True,
            rewrite_standalone=rewrite_standalone,
            store=loaded.store,
        )
    report = result.report
    report.source = source
    # A model the fold made invalid is bnfold's bug (InternalError), never written and never blamed
    # on the input, which passed the same checker when it was loaded.
    check_folded(result.model, source)
    folded_model = result.model
    if simplify:
        with step(progress, "simplifying with onnxsim"):
            folded_model = onnxsim_simplify(folded_model)
        account_for_simplify(report, folded_model)

    verification = None
    if verifier is not None:
        with naming(source, when="the original model"), _folded_is_ours():
            verification = verifier.compare(folded_model, atol=atol, rtol=rtol)
        del verifier
        report.extras["verification"] = verification.to_dict()

    with step(progress, f"hashing {source}"):
        before.files = digests.result()
    # Metadata and doc strings only: what was verified computes exactly what is written.
    record_provenance(folded_model, report, version=__version__, source_sha256=before.files[0].sha256)
    passed = verification is None or verification.passed
    written, saved_at, files = False, time.time(), []
    if destination is not None:
        if passed or force:
            use_external = loaded.used_external_data if external_data is None else external_data
            if os.fspath(destination) == STDOUT and external_data is None:
                use_external = False  # standard output holds one file: the weights go inline
            with step(progress, f"saving {destination}"):
                files = _save(folded_model, destination, use_external or None, saved_at, digest_output)
            written = True
        report.extras["output"] = str(output) if written else None
    after = model_stats(folded_model, files)
    return FileFoldResult(
        source,
        destination,
        folded_model,
        report,
        verification,
        written,
        source_files=before.files,
        before=before,
        after=after,
        store=loaded.store,
    )


def _fold_torch_source(
    source: str,
    output: PathLike | None,
    *,
    inputs: Mapping[str, np.ndarray] | PathLike | None,
    simplify: bool,
    input_shapes: Mapping[str, Sequence[int]] | None,
    force: bool,
    external_data: bool | None,
    progress: Progress | None,
    digest_output: bool,
    trust_code: bool = False,
    **options: Any,
) -> FileFoldResult:
    """Load a PyTorch model and run ``bnfold.export`` on it (fold in torch, export, fold, verify,
    provenance), then name the source in the metadata and write it the way an ONNX fold is written."""
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
    destination = None
    if output is not None:
        destination = check_output_path(output)
        if same_file(source, output):
            raise OutputError(f"{output}: is the input model; write the ONNX file elsewhere")
    shapes = {name: list(shape) for name, shape in (input_shapes or {}).items()}
    with step(progress, f"loading {source}"):
        module, example_inputs = load_torch_source(source, shapes or None, trust_code=trust_code)
    exported = export(module, example_inputs, None, progress=progress, **options)  # (its steps)
    report = exported.report
    report.source = source
    source_files = [file_info(source)] if Path(source).is_file() else []
    # export recorded what both folds did; the source file is the pipeline's to name.
    record_source(exported.model, source, source_files[0].sha256 if source_files else None)
    written, saved_at, files = False, time.time(), []
    if destination is not None:
        if exported.passed or force:
            with step(progress, f"saving {destination}"):
                files = _save(exported.model, destination, external_data, saved_at, digest_output)
            written = True
        report.extras["output"] = str(output) if written else None
    after = model_stats(exported.model, files)
    return FileFoldResult(
        source,
        destination,
        exported.model,
        report,
        exported.verification,
        written,
        source_files=source_files,
        after=after,
        export=exported,
    )


class _Digests:
    """SHA-256 of files, computed in a thread while the fold and the verification run (hashlib
    releases the GIL on large blocks)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._infos: list[FileInfo] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bnfold-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._infos = [file_info(path) for path in self._paths]
        except BaseException as error:  # re-raised in result(), on the caller's thread
            self._error = error

    def result(self) -> list[FileInfo]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._infos


def _save(
    model: ModelProto, destination: Path, external_data: bool | None, since: float, digest: bool
) -> list[FileInfo]:
    """Save ``model``; return the files written with their sizes (digests are added later, see
    ``digest_output``). Bytes sent to a stream (standard output, a device, a FIFO) cannot be read
    back: with ``digest`` they are hashed as they are written, and listed under the path given."""
    if output_target(destination).atomic or not digest:
        save_model(model, destination, external_data=external_data)
        return _sizes(_written_files(destination, since))
    with stream_digest() as streamed:
        save_model(model, destination, external_data=external_data)
    return [FileInfo(os.fspath(destination), streamed.size, streamed.sha256)]


def _written_files(path: Path | None, since: float) -> list[Path]:
    """The output model file and, when this save wrote one, its external ``.data`` file (none for
    standard output or a device: nothing to measure there)."""
    if path is None:
        return []
    target = output_target(path)
    if not target.atomic:
        return []
    path = target.real
    data = path.with_name(path.name + ".data")
    # A .data file left by an earlier save (one without external data now) is not part of this output.
    fresh = data.exists() and data.stat().st_mtime >= since - 1.0
    return [path, data] if fresh else [path]


def _sizes(paths: Sequence[Path]) -> list[FileInfo]:
    """Files with their sizes; the digest is left empty until asked for (``digest_output``)."""
    return [FileInfo(os.fspath(path), path.stat().st_size, "") for path in paths]


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file (the same path through links, or hard links)."""
    return same_path(first, second)


def check_paths(
    source: PathLike,
    output: PathLike | None,
    report_path: PathLike | None,
    inputs_path: PathLike | None,
    external_data: bool | None,
    data_files: Iterable[PathLike] = (),
) -> None:
    """Refuse to write any file that is read (the source, its external data ``data_files``, the
    inputs file) and to write one file twice (the output, its ``.data`` file, the report), through
    symbolic and hard links; ``-`` is standard output (for one of them only).

    Folding in place (``output`` is ``source``) replaces the model and its data together; whether
    that is allowed is decided by the caller (only after a verified fold).
    """
    if (
        output is not None
        and report_path is not None
        and os.fspath(output) == os.fspath(report_path) == STDOUT
    ):
        raise OutputError(
            "the output and {report_path} cannot both be standard output", parameters=("report_path",)
        )
    for path in (output, report_path):
        if path is not None:
            check_output_path(path)
    source_path = source if os.path.exists(source) else None  # None: a factory spec
    in_place = output is not None and source_path is not None and same_file(source, output)
    writes = [("the output", "the model", output), ("{report_path}", "the report", report_path)]
    if output is not None and external_data is not False:
        target = output_target(output)
        if target.atomic:
            writes.append(
                ("the output", "the model's data file", target.real.with_name(target.real.name + ".data"))
            )
    source_reads = [("the model", source_path), *(("the input's external data", path) for path in data_files)]
    reads = [("{inputs}", inputs_path)]
    if in_place:
        _check_disjoint([("{report_path}", "the report", report_path)], source_reads)
    else:
        reads += source_reads
    _check_disjoint(writes, reads)


def _check_disjoint(writes, reads) -> None:
    """:func:`check_disjoint`, its message naming the options as the caller spells them."""
    try:
        check_disjoint(writes, reads)
    except OutputError as error:
        raise OutputError(str(error), parameters=("report_path", "inputs")) from None


def check_report_path(report_path: PathLike, *models: PathLike | None) -> None:
    """Fail early when the JSON report cannot be written, or would overwrite a model."""
    check_output_path(report_path)
    _check_disjoint(
        [("{report_path}", "the report", report_path)], [("the model", model) for model in models]
    )


@contextlib.contextmanager
def _folded_is_ours() -> Iterator[None]:
    """ONNX Runtime refusing the folded model (FoldedModelRejectedError), where it loaded and ran the
    original, is a bug in the fold (InternalError), not bad input."""
    try:
        yield
    except FoldedModelRejectedError as error:
        raise InternalError(f"the fold made an invalid model, which was not written ({error})") from None


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
