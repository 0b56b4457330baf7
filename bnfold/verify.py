"""Prove a folded model computes what the original did: run both in ONNX Runtime, compare outputs.

Both models run with graph optimizations disabled — ONNX Runtime's own level-1 transformers fold
Conv->BN, so at the default level the "original" would already be folded and the check would
compare a fold with a fold. Inputs are random or real data
(:mod:`bnfold.verify_inputs` makes and checks them). Random inputs cover what a fold may have
decided: two runs, every dynamic dimension at two sizes, two seeds, one-element booleans at both
values; the result says what was covered and what could not be. The original runs first and its
session is freed before the folded model loads. Each output gets its own verdict (see
:mod:`bnfold.comparison`): the tolerance, and when over it, the distance of both models from the
original evaluated in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import ModelProto

from bnfold.comparison import (
    EXACT_MODES,
    OutputComparison,
    ReferenceUnavailable,
    VerificationResult,
    compare_output,
    default_tolerances,
    failed_outputs,
    judge_runs,
)
from bnfold.errors import BnfoldError, FoldedModelRejectedError, InputSpecError, ProviderUnavailableError
from bnfold.onnx.graph import subgraphs_of
from bnfold.onnx.io import has_data_on_disk, load_model, save_model
from bnfold.progress import Progress, step
from bnfold.subgraph_models import control_nodes
from bnfold.verify_inputs import (
    DEFAULT_SIZE_LADDER,
    InputCase,
    given_inputs,
    larger_default_shapes,
    parse_input_shapes,
    random_inputs,
    read_input_file,
    second_shapes,
    shapes_text,
)
from bnfold.verify_local import CHECKED, UNCOVERED, LocalCheck, check_subgraphs

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "verify",
    "Verifier",
    "InputCase",
    "EXACT_MODES",
    "default_tolerances",
    "compare_output",
    "parse_input_shapes",
    "read_input_file",
    "ort_session",
    "session_source",
    "run_session",
    "PROVIDERS",
]

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")

ModelSource = ModelProto | bytes | str | os.PathLike

LEAN_BYTES = 64 << 20
"""Above this many bytes of weights, a model reaches ONNX Runtime as a file with external data."""


def verify(
    original: ModelSource,
    folded: ModelSource,
    *,
    provider: str = "auto",
    input_shapes: Mapping[str, list[int]] | None = None,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    exact: str = "auto",
    progress: Progress | None = None,
) -> VerificationResult:
    """Run ``original`` and ``folded`` on the same inputs and compare every output.

    ``inputs`` is a dict or an ``.npz`` path of real data (one run). Otherwise inputs are random
    and there are two runs: dynamic dimensions at the size ``input_shapes`` gives (default 1) with
    ``seed``, then every dynamic dimension at a second size (3 for 1, else 1) with ``seed + 1``;
    one-element boolean inputs are True in the first run and False in the second. ``provider`` is
    ``cpu``, ``cuda`` or ``auto`` (CUDA when usable, else CPU); asking for CUDA where it cannot run
    raises :class:`ProviderUnavailableError`. ``atol``/``rtol`` override the per-dtype defaults.

    ``exact``: ``auto`` judges an output over the default tolerance against the original evaluated in
    float64 (see :mod:`bnfold.comparison`); ``always`` computes that evaluation for every output
    (and lets it pass an output over a given ``atol``/``rtol`` too); ``strict`` uses the tolerance
    alone. With ``atol``/``rtol`` given, ``auto`` uses the tolerance alone.

    ``progress`` is told about each step: each model's ONNX Runtime session, each run, the float64
    evaluation (see :mod:`bnfold.progress`).

    Folds in subgraphs no run reaches (an ``If`` branch not selected, a loop body that does not run)
    are checked locally: each subgraph the fold changed runs standalone, original and folded, on
    values captured from the original, judged the same way (``result.local``; see
    :mod:`bnfold.verify_local`). A local mismatch fails the verification.
    """
    verifier = Verifier(
        original,
        provider=provider,
        input_shapes=input_shapes,
        inputs=inputs,
        seed=seed,
        exact=exact,
        progress=progress,
    )
    return verifier.compare(folded, atol=atol, rtol=rtol)


class Verifier:
    """Runs the original model once, keeps its outputs, and frees its ONNX Runtime session.

    Made before folding, it lets a caller then fold the very same ModelProto in place, and the
    folded model's session never coexists with the original's: peak memory is one model's worth.
    The float64 reference (when needed) is evaluated from ``reference_source`` — by default the
    original itself; pass the original's path when you will edit the ModelProto in place.
    ``progress`` is told about each session, each run and the float64 evaluation.
    """

    def __init__(
        self,
        original: ModelSource,
        *,
        provider: str = "auto",
        input_shapes: Mapping[str, list[int]] | None = None,
        inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
        seed: int = 0,
        exact: str = "auto",
        reference_source: ModelSource | None = None,
        exact_limit_bytes: int | None = None,
        local_limit_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise BnfoldError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
        if exact not in EXACT_MODES:
            raise BnfoldError(f"unknown exact mode {exact!r}; choose from {', '.join(EXACT_MODES)}")
        if inputs is not None and input_shapes:
            raise InputSpecError(
                "give either {inputs} (real data, with its own shapes) or {input_shapes}, not both",
                parameters=("inputs", "input_shapes"),
            )
        self.exact = exact
        self.seed = seed
        self.exact_limit_bytes = exact_limit_bytes
        self.local_limit_bytes = local_limit_bytes
        self.progress = progress
        self.uncovered: list[str] = []
        self.notes: list[str] = []
        with self._step("loading the original model into ONNX Runtime"):
            session, self.provider = ort_session(original, provider, "original")
        self.input_names = [meta.name for meta in session.get_inputs()]
        self.output_names = [meta.name for meta in session.get_outputs()]
        if inputs is not None:
            self.cases = [InputCase(given_inputs(session, inputs), None)]
            self.input_source = "real" if isinstance(inputs, Mapping) else f"file {inputs}"
            self.uncovered.append("dynamic dimensions and seeds: the given inputs were run as they are")
            with self._run_step("original", self.cases[0], 1):
                self.cases[0].expected = run_session(session, self.cases[0].feeds, "original")
        else:
            self.input_source = "random"
            self.cases = self._run_random_cases(session, input_shapes or {}, seed)
        del session  # ONNX Runtime frees the original's weights here, before the folded model loads
        self._structure_notes(original)
        self._reference_source = original if reference_source is None else reference_source
        self._reference: tuple[list[list[np.ndarray]], float] | None = None
        if exact == "always":
            with contextlib.suppress(ReferenceUnavailable):  # compare() says why
                self._reference_outputs()  # now, before a caller edits ``original`` in place

    def _run_random_cases(self, session, shapes: Mapping[str, list[int]], seed: int) -> list[InputCase]:
        metas = session.get_inputs()
        first = InputCase(random_inputs(session, shapes, seed, boolean=True), seed)
        grown = False
        try:
            with self._run_step("original", first, 1):
                first.expected = run_session(session, first.feeds, "original")
        except InputSpecError as error:
            first, grown = self._first_run_at_larger_sizes(session, shapes, seed, error), True
        primary = {name: list(value.shape) for name, value in first.feeds.items()}
        other_shapes = second_shapes(metas, primary, grow=grown)
        second = None
        if other_shapes != primary:
            candidate = InputCase(random_inputs(session, other_shapes, seed + 1, boolean=False), seed + 1)
            try:
                with self._run_step("original", candidate, 2):
                    candidate.expected = session.run(None, candidate.feeds)
                second = candidate
            except Exception as error:  # the model rejects the second size: say so, run the first
                self.uncovered.append(
                    f"a second size of the dynamic dimensions ({shapes_text(other_shapes)}): the original "
                    f"model rejects it ({_first_line(error)}); pass --input-shape to choose sizes it accepts"
                )
        if second is None:
            second = InputCase(random_inputs(session, primary, seed + 1, boolean=False), seed + 1)
            with self._run_step("original", second, 2):
                second.expected = run_session(session, second.feeds, "original")
        return [first, second]

    def _first_run_at_larger_sizes(
        self, session, shapes: Mapping[str, list[int]], seed: int, error: InputSpecError
    ) -> InputCase:
        """The first run again, with the dynamic dimensions the user did not size at
        :data:`DEFAULT_SIZE_LADDER`'s sizes (the first axis stays 1): a CNN with a dynamic height and
        width cannot pool a 1x1 image. The first that the original runs is used, and said; when none
        runs, the error of the plain run stands (naming ``--input-shape``)."""
        for size in DEFAULT_SIZE_LADDER:
            sized = larger_default_shapes(session.get_inputs(), shapes, size)
            if not sized:
                break  # no dynamic dimension left to size: the failure is not about sizes
            case = InputCase(random_inputs(session, sized, seed, boolean=True), seed)
            try:
                with self._run_step("original", case, 1):
                    case.expected = run_session(session, case.feeds, "original")
            except InputSpecError:
                continue
            self.notes.append(
                f"the original rejects dynamic dimensions at 1 ({_first_line(error)}); ran them at {size} "
                "(the first axis at 1); pass --input-shape to choose"
            )
            return case
        raise error

    def _structure_notes(self, original: ModelSource) -> None:
        """What no choice of inputs reaches: an If whose condition the model computes (unless the
        local checks reach its changed branches), and loop iterations beyond those the inputs give."""
        model = _as_model(original)
        self._computed_ifs: list[tuple[tuple, str]] = []
        self._loops: list[str] = []
        if model is None:
            return
        inputs = {value.name for value in model.graph.input}
        for path, node in control_nodes(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "If" and node.input[0] not in inputs:
                self._computed_ifs.append((path, node.name or node.output[0]))
            elif node.op_type in ("Loop", "Scan"):
                self._loops.append(node.name or node.output[0])

    def _uncovered(self, local: list[LocalCheck]) -> list[str]:
        """The structure notes, with an If left out when a branch the fold changed was checked locally
        and none was left unchecked (a branch the fold did not change decides nothing), and each
        subgraph the fold changed that no check reached, with its reason."""
        items = list(self.uncovered)
        if self._loops:
            items.append(
                f"Loop/Scan node(s) {_shown(self._loops)}: ran only the iteration counts these inputs give"
            )
        reached: dict[tuple, list[LocalCheck]] = {}
        for check in local:
            reached.setdefault(check.path, []).append(check)
        computed = [
            label
            for path, label in self._computed_ifs
            if not any(check.status == CHECKED for check in reached.get(path, []))
            or any(check.status == UNCOVERED for check in reached[path])
        ]
        if computed:
            items.append(
                f"If node(s) {_shown(computed)}: the condition is computed in the model, so only the branch "
                "these inputs select was run, and the other was not checked locally"
            )
        items += [check.describe() for check in local if check.status == UNCOVERED]
        return items

    def _local_checks(self, folded: ModelSource, atol: float | None, rtol: float | None) -> list[LocalCheck]:
        """Every subgraph the fold changed, checked on values captured from the original."""
        from bnfold.reference import DEFAULT_LIMIT_BYTES

        original = _as_model(self._reference_source)
        if original is None or not any(True for _ in control_nodes(original.graph)):
            return []
        folded_model = _as_model(folded)
        if folded_model is None:
            return []
        provider = "cuda" if self.provider == "cuda" else "cpu"
        with self._step("checking the subgraphs of If/Loop/Scan nodes on captured values"):
            return check_subgraphs(
                original,
                folded_model,
                [case.feeds for case in self.cases],
                open_session=lambda model, role: ort_session(model, provider, role)[0],
                atol=atol,
                rtol=rtol,
                exact=self.exact,
                reference_limit_bytes=DEFAULT_LIMIT_BYTES
                if self.exact_limit_bytes is None
                else self.exact_limit_bytes,
                capture_limit_bytes=self.local_limit_bytes,
            )

    def _reference_outputs(self) -> tuple[list[list[np.ndarray]], float]:
        """The original's float64 outputs per run (computed once), and the seconds they took."""
        from bnfold.reference import DEFAULT_LIMIT_BYTES, evaluate_float64

        if self._reference is None:
            limit = DEFAULT_LIMIT_BYTES if self.exact_limit_bytes is None else self.exact_limit_bytes
            with self._step("evaluating the original model in float64"):
                run = evaluate_float64(
                    self._reference_source, [case.feeds for case in self.cases], limit_bytes=limit
                )
            self._reference = (run.outputs, run.seconds)
        return self._reference

    def compare(
        self,
        folded: ModelSource,
        *,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> VerificationResult:
        """Run ``folded`` on the original's inputs and judge every output (see :func:`verify`)."""
        with self._step("loading the folded model into ONNX Runtime"):
            folded_session, _ = ort_session(folded, "cuda" if self.provider == "cuda" else "cpu", "folded")
        _check_same_signature(self.input_names, self.output_names, folded_session)
        actual, failure = [], None
        for number, case in enumerate(self.cases, 1):
            try:
                with self._run_step("folded", case, number):
                    actual.append(folded_session.run(None, case.feeds))
            except Exception as error:  # inputs the original runs: the folded model must run them too
                shapes = shapes_text(case.describe()["input_shapes"])
                failure = (
                    f"the folded model fails on {shapes}, which the original runs ({_first_line(error)})"
                )
                break
        del folded_session
        if failure is not None:
            outputs, reference = failed_outputs(self.output_names, self.cases[0].expected, failure), None
        else:
            outputs, reference = judge_runs(
                self.output_names,
                [case.expected for case in self.cases],
                actual,
                atol=atol,
                rtol=rtol,
                exact=self.exact,
                reference=self._reference_outputs,
            )
        outputs = self._nothing_compared(outputs)
        started = time.perf_counter()
        local = self._local_checks(folded, atol, rtol) if failure is None else []
        checked = sum(check.status == CHECKED for check in local)
        notes = list(self.notes)
        if checked:
            notes.append(f"local checks: {checked} subgraph(s) in {time.perf_counter() - started:.2f} s")
        first = self.cases[0]
        return VerificationResult(
            outputs=outputs,
            provider=self.provider,
            seed=self.seed if first.seed is not None else 0,
            input_shapes=first.describe()["input_shapes"],
            input_source=self.input_source,
            notes=notes,
            runs=[case.describe() for case in self.cases],
            uncovered=self._uncovered(local),
            reference=reference,
            mode=self.exact,
            local=local,
        )

    def _step(self, text: str) -> contextlib.AbstractContextManager[None]:
        return step(self.progress, f"verifying: {text}")

    def _run_step(self, role: str, case: InputCase, number: int) -> contextlib.AbstractContextManager[None]:
        shapes = shapes_text(case.describe()["input_shapes"])
        return self._step(f"run {number} of the {role} model ({shapes})")

    def _nothing_compared(self, outputs: list[OutputComparison]) -> list[OutputComparison]:
        """Every output empty in every run (a batch of 0, a static 0-sized dimension) compared
        nothing, which is not a pass: the outputs fail (a model that can only compute empty
        outputs), or given inputs with an empty array are refused as the input error they are."""
        if any(np.asarray(value).size for case in self.cases for value in case.expected):
            return outputs
        if self.input_source != "random":
            empty = [name for name, value in self.cases[0].feeds.items() if value.size == 0]
            if empty:
                shape = list(self.cases[0].feeds[empty[0]].shape)
                where = (
                    self.input_source.removeprefix("file ") + ": "
                    if self.input_source.startswith("file ")
                    else ""
                )
                raise InputSpecError(
                    f"{where}--inputs {empty[0]}: shape {shape} is empty, so every output is empty and "
                    "nothing would be compared; give at least one sample"
                )
        note = "compared nothing: the output is empty in every run"
        return [dataclasses.replace(output, passed=False, note=note) for output in outputs]


def _shown(labels: list[str]) -> str:
    return ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _as_model(source: ModelSource) -> ModelProto | None:
    if isinstance(source, ModelProto):
        return source
    if isinstance(source, bytes):
        parsed = ModelProto()
        parsed.ParseFromString(source)
        return parsed
    try:
        return load_model(source, lazy=True).model
    except BnfoldError:
        return None


# -- sessions ------------------------------------------------------------------------------------
def ort_session(model: ModelSource, provider: str, role: str):
    """An ONNX Runtime session on ``provider`` (``cpu``, ``cuda``, ``auto``) with graph optimizations
    off (the model runs as written), and the provider it got; ``role`` names the model in errors.

    ``cuda`` where CUDA cannot run is an error, never a silent fallback to the CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda_available = "CUDAExecutionProvider" in available
    if provider == "cuda" and not cuda_available:
        raise ProviderUnavailableError(
            "CUDA was requested but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu on a machine with an NVIDIA GPU), or use --provider cpu"
        )
    want_cuda = provider == "cuda" or (provider == "auto" and cuda_available)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # FATAL only: errors reach the user in our one-line message
    # Prepacked weights are copies: without them, weights stored as external data stay mapped from
    # their file (a verification's peak memory about 1.2x the model instead of 2x).
    options.add_session_config_entry("session.disable_prepacking", "1")
    with session_source(model) as source:
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises several unrelated exception types here
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            error_type = FoldedModelRejectedError if role == "folded" else BnfoldError
            raise error_type(
                f"ONNX Runtime cannot load the {role} model ({message}); use --no-verify to skip"
            ) from None
    used_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    if provider == "cuda" and not used_cuda:
        raise ProviderUnavailableError(
            "CUDAExecutionProvider is installed but could not start (CUDA/cuDNN libraries or GPU "
            "missing); use --provider cpu"
        )
    return session, "cuda" if used_cuda else "cpu"


@contextlib.contextmanager
def session_source(model: ModelSource) -> Iterator[bytes | str]:
    """Bytes or a path ONNX Runtime can load, with trailing empty node outputs dropped.

    Empty trailing outputs mean nothing, but ONNX Runtime 1.32 crashes (SIGSEGV) on a
    BatchNormalization-9 that lists them when graph optimizations are disabled.

    Memory: ONNX Runtime maps weights stored as external data into memory (with prepacking off,
    see :func:`ort_session`), but parses embedded ones and then copies them (about 2x the model at
    its peak). So a file with external data goes by its path; a model of more than
    :data:`LEAN_BYTES` of weights otherwise (embedded in its file, left on disk by a lazy load, or
    in memory) is written with external data to a temporary directory (``TMPDIR``; file ranges are
    copied by the kernel, not read) and goes by that path; a small one goes as bytes.
    """
    if isinstance(model, bytes):
        parsed = ModelProto()
        parsed.ParseFromString(model)
        model = parsed
    elif not isinstance(model, ModelProto):
        path = model
        loaded = load_model(path, lazy=True)
        model = loaded.model
        small = os.path.getsize(path) <= LEAN_BYTES
        # (ONNX Runtime takes only UTF-8 paths: another is copied to the temporary directory below)
        if (
            (loaded.used_external_data or small)
            and not _lists_trailing_empty_outputs(model.graph)
            and _is_utf8(os.fspath(path))
        ):
            del model, loaded
            yield os.fspath(path)
            return
    with _without_trailing_empty_outputs(model):
        serialized = None
        if not has_data_on_disk(model) and model.ByteSize() <= LEAN_BYTES:
            with contextlib.suppress(EncodeError, ValueError):
                serialized = model.SerializeToString()
        if serialized is not None:
            yield serialized
            return
        with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as directory:
            path = Path(directory) / "model.onnx"
            save_model(model, path, external_data=True)
            yield str(path)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes, kept as surrogates
        return False
    return True


def _lists_trailing_empty_outputs(graph: onnx.GraphProto) -> bool:
    return any(
        (len(node.output) > 1 and node.output[-1] == "")
        or any(_lists_trailing_empty_outputs(subgraph) for _, subgraph in subgraphs_of(node))
        for node in graph.node
    )


@contextlib.contextmanager
def _without_trailing_empty_outputs(model: ModelProto) -> Iterator[None]:
    trimmed: list[tuple[onnx.NodeProto, int]] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            count = 0
            while len(node.output) > 1 and node.output[-1] == "":
                del node.output[-1]
                count += 1
            if count:
                trimmed.append((node, count))
            for _, subgraph in subgraphs_of(node):
                visit(subgraph)

    visit(model.graph)
    try:
        yield
    finally:
        for node, count in trimmed:
            node.output.extend([""] * count)


def _check_same_signature(input_names: list[str], output_names: list[str], folded) -> None:
    folded_inputs = [meta.name for meta in folded.get_inputs()]
    if input_names != folded_inputs:
        raise FoldedModelRejectedError(f"the models have different inputs: {input_names} vs {folded_inputs}")
    folded_outputs = [meta.name for meta in folded.get_outputs()]
    if output_names != folded_outputs:
        raise FoldedModelRejectedError(
            f"the models have different outputs: {output_names} vs {folded_outputs}"
        )


def run_session(session, feeds: dict[str, np.ndarray], role: str) -> list[np.ndarray]:
    """Every output of ``session`` on ``feeds``; a failure is an InputSpecError naming ``role``."""
    try:
        return session.run(None, feeds)
    except Exception as error:  # invalid shapes reach us as ORT runtime errors
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputSpecError(
            f"ONNX Runtime failed to run the {role} model on the inputs ({message}); "
            "check {input_shapes} / {inputs}",
            parameters=("input_shapes", "inputs"),
        ) from None
