"""``bnfold.export``: fold in torch, export to ONNX, fold what is left, verify against the original, write.

The order matters. Folding in torch first means the exporter sees no foldable BatchNorm (the legacy
exporter would otherwise fold Conv->BN itself, in float32, without a report). The export keeps any
BN that torch kept (``training=TrainingMode.PRESERVE``), so the ONNX fold gets its own look at it:
a conv module called twice is refused in torch but is two Conv nodes with a shared weight in ONNX,
which bnfold's ONNX fold handles by copying the weight. Verification compares the final ONNX model
in ONNX Runtime against the *original* module's torch outputs — not the folded module's — so a
mistake anywhere in the chain (trace, fold, export, ONNX fold) shows up.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx import ModelProto
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.fx.compare import (
    compare_runs_with_onnx,
    covered_runs,
    float64_outputs,
    module_copier,
    module_outputs,
    output_names,
)
from bnfold.fx.fold import ModuleFoldResult, fold_module
from bnfold.fx.trace import as_args, input_copies
from bnfold.onnx import fold_onnx, save_model
from bnfold.onnx.io import check_output_path
from bnfold.progress import Progress, step
from bnfold.provenance import (
    ABSORBING,
    absorption_line,
    annotate_nodes,
    decisions_on_nodes,
    record_metadata,
    rules_applied,
)
from bnfold.report import Report
from bnfold.verify import PROVIDERS, VerificationResult
from bnfold.version import __version__

__all__ = ["ExportResult", "export", "EXPORTERS", "record_export_provenance"]

logger = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS = ("torchscript", "dynamo")


@dataclass
class ExportResult:
    """What ``export`` did: the model it wrote (or would have), the reports, the check.

    ``report`` is the torch fold's report; its ``extras`` also hold the ONNX fold's report
    (``onnx_fold``), the verification and the output path, so ``report.to_json()`` is complete.
    ``written`` is False when verification failed (and ``force`` was not given).
    """

    path: Path | None
    model: ModelProto
    report: Report
    onnx_report: Report
    verification: VerificationResult | None
    fold: ModuleFoldResult
    written: bool

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_text(self) -> str:
        parts = [self.report.to_text()]
        if self.onnx_report.decisions:
            parts.append("left for the ONNX fold:\n" + self.onnx_report.to_text())
        if self.verification is not None:
            parts.append(self.verification.to_text())
        if self.path is not None:
            parts.append(f"wrote {self.path}" if self.written else f"did not write {self.path}")
        return "\n\n".join(parts)


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike | None,
    *,
    opset: int = 17,
    exporter: Exporter = "torchscript",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    skip_rules: Iterable[str] = (),
    rewrite_standalone: bool = False,
    verify: bool = True,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    external_data: bool | None = None,
    exact: str = "auto",
    progress: Progress | None = None,
) -> ExportResult:
    """Fold ``model`` (eval mode), export it to ONNX at ``path``, and prove the file computes what it did.

    ``example_inputs`` (a tensor or tuple) drive tracing, export and verification. ``exporter``:
    ``torchscript`` (``torch.onnx.export(dynamo=False)``, takes ``dynamic_axes``) or ``dynamo``
    (takes ``dynamic_shapes``; opset >= 18). Graph inputs are named ``input`` / ``input_0``... and
    outputs ``output`` / ``output_0``... unless ``input_names`` / ``output_names`` are given.

    The file is written atomically, and only after verification passed (ONNX Runtime on
    ``provider``, graph optimizations off, against the original module's torch outputs), unless
    ``force``; a mismatch is a result (``result.written`` False, ``result.verification`` falsy).
    Verification runs at the example inputs and at a second size of every dynamic axis
    (``dynamic_axes`` / ``dynamic_shapes``), judged as :func:`bnfold.verify` judges: ``exact``
    ``auto`` evaluates the module in float64 for an output over tolerance, ``always``, ``strict``.
    A module symbolic_trace cannot trace is traced by torch.export with the ``dynamic_axes`` kept
    symbolic; where torch.export cannot keep them so, or where its graph reads a size (which the
    torchscript exporter would record as a constant), ``export`` refuses rather than write a file
    that holds the example's sizes. ``path=None`` does everything but write (a dry run).
    ``skip_rules`` takes rule names of either backend (``bnfold.fx.rule_names()``,
    ``bnfold.onnx.rule_names()``). ``rewrite_standalone`` rewrites each BN left after both folds as
    Mul + Add (see ``fold_onnx``). ``progress`` is told about each step (the folds, the export,
    the module's runs, the exported model's session and each of its runs; :mod:`bnfold.progress`).
    """
    if exporter not in EXPORTERS:
        raise BnfoldError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if provider not in PROVIDERS:
        raise BnfoldError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if exporter == "torchscript" and dynamic_shapes is not None:
        raise BnfoldError(
            "dynamic_shapes is for exporter='dynamo'; the torchscript exporter takes dynamic_axes"
        )
    if exporter == "dynamo" and dynamic_axes is not None:
        raise BnfoldError(
            "dynamic_axes is for exporter='torchscript'; the dynamo exporter takes dynamic_shapes"
        )
    destination = check_output_path(path) if path is not None else None
    torch_skips, onnx_skips = _split_skips(skip_rules)
    args = as_args(example_inputs)
    if args is None:
        raise BnfoldError("export needs example_inputs")
    names_in = list(input_names) if input_names else _io_names("input", len(args))
    # A fold that falls back to torch.export keeps the axes the file will call dynamic symbolic (the
    # export refuses a model that needs one fixed), instead of specialising to the example's sizes.
    trace_shapes = dynamic_shapes
    if dynamic_axes and dynamic_shapes is None:
        trace_shapes = _axes_as_dynamic_shapes(dynamic_axes, names_in, args)
    try:
        with step(progress, "folding in torch"):
            folded = fold_module(
                model, args, skip_rules=torch_skips, dynamic_shapes=trace_shapes, verify=False
            )
    except BnfoldError as error:
        if trace_shapes is dynamic_shapes:
            raise
        fold_module(model, args, skip_rules=torch_skips, verify=False)  # fails too: its error says why
        raise _axes_not_dynamic(dynamic_axes, names_in, args, error) from None
    if exporter == "torchscript" and dynamic_axes:
        _check_sizes_stay_dynamic(folded)
    with step(progress, "running the module on the verification inputs"):
        expected = module_outputs(model, args)
        runs, uncovered = [], []
        if verify:  # the original's outputs now: the checks run on the exported file later
            axes = _export_axes(dynamic_axes, dynamic_shapes, names_in, args)
            runs, uncovered = covered_runs(model, args, axes=axes)
    names_out = list(output_names) if output_names else _default_output_names(len(expected))
    # The exporter runs the module: on copies, so that one writing into its inputs leaves the runs' own.
    with step(progress, f"exporting to ONNX ({exporter} exporter)"):
        exported = _export(
            folded.module,
            input_copies(args),
            names_in,
            names_out,
            opset,
            exporter,
            dynamic_axes,
            dynamic_shapes,
        )
    with step(progress, "folding the exported ONNX model"):
        onnx_result = fold_onnx(
            exported, skip_rules=onnx_skips, inplace=True, rewrite_standalone=rewrite_standalone
        )
    onnx_model = onnx_result.model
    try:
        onnx.checker.check_model(onnx_model)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise BnfoldError(f"the exported ONNX model is invalid ({str(error).splitlines()[0]})") from None
    report = folded.report
    report.extras["output"] = str(destination) if destination else None
    report.extras["exporter"] = exporter
    report.extras["onnx_fold"] = onnx_result.report.to_dict()
    # Metadata and doc strings only (before verification: what is verified is what is written).
    record_export_provenance(onnx_model, report, onnx_result.report, exporter=exporter)
    verification = None
    if verify:
        cache: list = []

        def reference():
            if not cache:
                with step(progress, "verifying: evaluating the module in float64"):
                    cache.append(float64_outputs(module_copier(model), runs))
            return cache[0]

        verification = compare_runs_with_onnx(
            runs,
            onnx_model,
            provider=provider,
            atol=atol,
            rtol=rtol,
            exact=exact,
            reference=reference,
            uncovered=uncovered,
            progress=progress,
        )
        report.extras["verification"] = verification.to_dict()
    written = destination is not None and (verification is None or verification.passed or force)
    if written:
        with step(progress, f"saving {destination}"):
            save_model(onnx_model, destination, external_data=external_data)
    elif destination is not None:
        logger.warning(
            "not writing %s: the ONNX model does not match the module\n%s",
            destination,
            verification.to_text(),
        )
    return ExportResult(destination, onnx_model, report, onnx_result.report, verification, folded, written)


def record_export_provenance(
    model: ModelProto, torch_report: Report, onnx_report: Report, *, exporter: str
) -> int:
    """Provenance of both folds in the exported model (see :mod:`bnfold.provenance`); returns how
    many doc string lines were added.

    ``bnfold.summary`` holds the torch fold's counts (the report's), ``bnfold.onnx_fold_summary`` the
    ONNX fold's (BNs torch kept and the exported graph let fold), ``bnfold.rules_applied`` the rules
    of both. A layer that absorbed a BN in torch is found in the file by its weight's name (both
    exporters name initializers by the parameter's qualified name) or, failing that, by the module
    path the exporter records (the torchscript node name, the dynamo ``namespace``); a layer found
    neither way, or found twice, gets no line.
    """
    record_metadata(
        model,
        torch_report,
        version=__version__,
        rules=[*rules_applied(torch_report), *rules_applied(onnx_report)],
        extra={
            "onnx_fold_summary": json.dumps(onnx_report.summary().to_dict(), sort_keys=True),
            "exporter": exporter,
        },
    )
    lines = list(decisions_on_nodes(model, onnx_report))
    for decision in torch_report.decisions:
        if decision.outcome in ABSORBING and decision.into:
            node = _exported_layer(model.graph, decision.into)
            if node is not None:
                lines.append((node, absorption_line(decision, backend="torch")))
    return annotate_nodes(model, lines)


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _exported_layer(graph: onnx.GraphProto, module: str) -> onnx.NodeProto | None:
    """The one layer node of ``graph`` that module ``module`` (a qualified name) became, or None."""
    initializers = {tensor.name for tensor in graph.initializer}
    layers = [node for node in graph.node if node.op_type in _LAYER_OPS and node.domain in ("", "ai.onnx")]
    weight = f"{module}.weight"
    by_weight = [node for node in layers if weight in initializers and weight in node.input]
    if by_weight:
        return by_weight[0] if len(by_weight) == 1 else None

    def scopes(node: onnx.NodeProto) -> set[str]:
        found = set(node.name.split("/"))  # torchscript: /features.0/Conv
        for prop in node.metadata_props:  # dynamo: features: ...Sequential/features.0: ...Conv2d/...
            if prop.key == "namespace":
                found.update(part.split(": ", 1)[0] for part in prop.value.split("/"))
        return found

    by_scope = [node for node in layers if module in scopes(node)]
    return by_scope[0] if len(by_scope) == 1 else None


def _axes_as_dynamic_shapes(
    dynamic_axes: Mapping[str, Any], input_names: Sequence[str], args: tuple[Any, ...]
) -> tuple[Any, ...] | None:
    """``dynamic_axes`` of the positional inputs as torch.export ``dynamic_shapes`` (a ``Dim`` per
    axis; axes given one name share one ``Dim``, as they share one size in the file)."""
    dims: dict[str, Any] = {}
    entries: list[Any] = []
    for name in list(input_names)[: len(args)]:
        entry = dynamic_axes.get(name)
        named = entry if isinstance(entry, Mapping) else {axis: None for axis in entry or ()}
        shape: dict[int, Any] = {}
        for axis, label in named.items():
            key = str(label) if label else f"{name}_{axis}"
            identifier = "".join(c if c.isalnum() else "_" for c in key)
            identifier = identifier if identifier[:1].isalpha() else f"d_{identifier}"
            shape[int(axis)] = dims.setdefault(identifier, torch.export.Dim(identifier))
        entries.append(shape or None)
    return tuple(entries) if any(entry is not None for entry in entries) else None


def _axes_not_dynamic(
    dynamic_axes: Mapping[str, Any], input_names: Sequence[str], args: tuple[Any, ...], error: BnfoldError
) -> BnfoldError:
    """The refusal when torch.export traces the module at the example's sizes but not with the
    ``dynamic_axes`` symbolic: a file exported from that graph would hold the example's sizes."""
    ones = []
    for value, name in zip(args, input_names, strict=False):
        for axis in dynamic_axes.get(name) or ():
            if isinstance(value, torch.Tensor) and int(axis) < value.dim() and value.shape[int(axis)] == 1:
                ones.append(f"{name} axis {axis}")
    message = str(error)  # "cannot trace the model (...; torch.export: REASON); ..."
    reason = message.split("torch.export: ", 1)[-1].rsplit("); ", 1)[0]
    advice = (
        f"the example has size 1 on {', '.join(ones)}, which torch.export treats as fixed: give an "
        "example of size 2 or more there"
        if ones
        else "the module's code fixes them (e.g. a branch on a size), so they cannot be dynamic in the file"
    )
    return BnfoldError(
        "dynamic_axes: symbolic_trace cannot trace the module and torch.export cannot keep those axes "
        f"dynamic ({reason}); {advice}, or drop dynamic_axes"
    )


_SIZE_READS = ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset")


def _check_sizes_stay_dynamic(folded: ModuleFoldResult) -> None:
    """Refuse a graph the torchscript exporter would record with the example's sizes.

    torch.onnx's torchscript exporter runs the module with the example inputs and records its ops; a
    torch.export graph reads sizes with ``aten.sym_size`` and the like, whose results the recording
    keeps as constants. A file that declares ``dynamic_axes`` would then compute with the example's
    sizes at every other size. (symbolic_trace graphs read sizes with ``Tensor.size``, which the
    exporter records as an op.)
    """
    if folded.tracer != "torch.export":
        return
    reads = sorted(
        {
            node.name
            for node in folded.module.graph.nodes
            if node.op == "call_function"
            and getattr(getattr(node.target, "_overloadpacket", None), "__name__", "") in _SIZE_READS
        }
    )
    if reads:
        shown = ", ".join(reads[:3]) + (f" and {len(reads) - 3} more" if len(reads) > 3 else "")
        raise BnfoldError(
            "dynamic_axes: the module was traced with torch.export (symbolic_trace cannot trace it) "
            f"and its graph reads input sizes ({shown}), which the torchscript exporter would record "
            "as the example's sizes; use exporter='dynamo' with dynamic_shapes, or drop dynamic_axes"
        )


def _export_axes(dynamic_axes, dynamic_shapes, input_names, args) -> dict[int, set[int]]:
    """Positional input -> its dynamic axes in the exported file (none: the file's shapes are fixed)."""
    from bnfold.fx.fold import dynamic_axes_of

    if dynamic_shapes is not None:
        return dynamic_axes_of(dynamic_shapes, args) or {}
    axes: dict[int, set[int]] = {}
    for index, name in enumerate(list(input_names)[: len(args)]):
        entry = (dynamic_axes or {}).get(name)
        if isinstance(entry, dict):
            axes[index] = {int(axis) for axis in entry}
        elif isinstance(entry, list | tuple):
            axes[index] = {int(axis) for axis in entry}
    return axes


def _io_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{index}" for index in range(count)]


def _default_output_names(count: int) -> list[str]:
    return output_names(count)


def _split_skips(skip_rules: Iterable[str]) -> tuple[list[str], list[str]]:
    """``--skip-rule`` names for the torch fold and for the ONNX fold; a name neither knows is an error.

    Both backends name the same pattern the same way (``conv-bn``, ``bn-conv``), so skipping it
    skips it in both.
    """
    from bnfold.fx.fold import rule_names as torch_rule_names
    from bnfold.onnx import rule_names as onnx_rule_names

    names = list(skip_rules)
    torch_names, onnx_names = set(torch_rule_names()), set(onnx_rule_names())
    unknown = sorted(set(names) - torch_names - onnx_names)
    if unknown:
        raise BnfoldError(f"unknown rule(s) {unknown}; choose from {sorted(torch_names | onnx_names)}")
    return [n for n in names if n in torch_names], [n for n in names if n in onnx_names]


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    exporter: str,
    dynamic_axes: Mapping[str, Any] | None,
    dynamic_shapes: Any,
) -> ModelProto:
    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as directory:
        raw_path = Path(directory) / "model.onnx"
        try:
            with warnings.catch_warnings():
                # The legacy exporter is deprecated but is the one that keeps BN for us to report on.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", message="It is recommended that constant folding")
                # torch.export's input guards (torch._assert in torch/__init__.py) trace to constants;
                # TracerWarnings raised from the user's own code still show.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch")
                if exporter == "torchscript":
                    torch.onnx.export(
                        module,
                        args,
                        str(raw_path),
                        dynamo=False,
                        opset_version=opset,
                        # PRESERVE: the eval-mode peephole pass (which folds Conv->BN in float32,
                        # with no report) is skipped; the module is in eval mode, so BN exports as
                        # inference-mode BatchNormalization.
                        training=torch.onnx.TrainingMode.PRESERVE,
                        do_constant_folding=True,
                        input_names=input_names,
                        output_names=output_names,
                        dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                    )
                else:
                    program = torch.onnx.export(
                        module,
                        args,
                        dynamo=True,
                        opset_version=opset,
                        input_names=input_names,
                        output_names=output_names,
                        dynamic_shapes=dynamic_shapes,
                        verbose=False,
                    )
                    program.save(str(raw_path))
        except BnfoldError:
            raise
        except Exception as error:  # exporters raise many types; the user needs the first line
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if exporter == "torchscript" and "HigherOrderOperator" in message:
                # torch.cond / while_loop / map calls: only the dynamo exporter writes them (If, Loop)
                message += "; models with torch.cond or other control-flow operators need exporter='dynamo'"
            raise BnfoldError(f"torch.onnx.export ({exporter}) failed: {message}") from None
        return onnx.load(str(raw_path))
