"""Export a torch module to ONNX with every BatchNorm kept as a BatchNormalization node.

Both torch exporters fold BatchNorm on their own by default, which would leave bnfold
nothing to do: the TorchScript ("legacy") exporter fuses Conv->BN in its eval-mode
peephole pass, and the dynamo exporter's onnxscript optimizer has BN-fusion rewrite
rules. ``export_onnx`` switches both off and then checks that nothing was folded.

Choice of exporter (measured with torch 2.13.0 CPU, onnxscript 0.7.2, on the eight
reference models in ``models.registry``):

* ``"torchscript"`` (default): ``dynamo=False, training=TrainingMode.PRESERVE,
  do_constant_folding=True``. Constant folding stays on (so a bias-free Linear's weight
  transpose is folded into a MatMul initializer instead of a runtime Transpose), while
  PRESERVE skips the eval-only peephole pass that is the only place it fuses Conv->BN.
  0.01-0.07 s per model, opsets 7-20, clean graphs, every model exact in ONNX Runtime.
  It is deprecated (we silence its DeprecationWarning here) but present in torch 2.13.
* ``"dynamo"``: ``dynamo=True, optimize=False`` plus a small clean-up. 0.5-0.9 s per model
  after a ~1.5 s first-call warm-up, i.e. 10-50x slower. Raw output is not usable as-is:
  every bias-free conv gets a zero bias computed at run time (Shape/Concat/CastLike/
  Expand), and for Conv3d that bias has the wrong shape [C_out, 2] (a torchlib bug in
  onnxscript 0.7.2), so ONNX Runtime rejects conv3d_net. Its native opset is 18+;
  down-converting to 17 fails on the unfolded graph, and after folding the ONNX C
  converter leaves ``noop_with_empty_axes`` on ReduceMean, which the checker rejects.
  We fold constants and drop all-zero optional biases, which fixes all eight models,
  but accept only ``opset >= 18``. Kept as the way forward once the legacy exporter is
  removed from torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

__all__ = ["Exporter", "count_ops", "export_onnx", "main"]

Exporter = Literal["torchscript", "dynamo"]

#: Lowest opset the dynamo exporter emits natively (see the module docstring).
DYNAMO_MIN_OPSET = 18


def count_ops(model: onnx.ModelProto) -> Counter[str]:
    """Node counts by op type in the main graph (what the tests and the CLI report)."""
    return Counter(node.op_type for node in model.graph.node)


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Both exporters want a tuple of positional inputs; accept a lone tensor too."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _io_names(prefix: str, count: int) -> list[str]:
    """Stable graph I/O names: 'input'/'output' for one tensor, 'input_0', ... for several."""
    return [prefix] if count == 1 else [f"{prefix}_{index}" for index in range(count)]


def _count_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Number of output tensors, so that every graph output can be given a name."""
    with torch.no_grad():
        outputs = module(*inputs)
    return _count_tensors(outputs)


def _count_tensors(value: object) -> int:
    """Tensors in a (possibly nested) tuple/list/dict, in the order exporters flatten them."""
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, tuple | list):
        return sum(_count_tensors(item) for item in value)
    if isinstance(value, dict):
        return sum(_count_tensors(item) for item in value.values())
    return 0


def _export_torchscript(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> onnx.ModelProto:
    """Legacy exporter with constant folding on but the Conv->BN eval peephole off."""
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as directory:
        raw_path = Path(directory) / "model.onnx"
        with warnings.catch_warnings():
            # Chosen deliberately (see module docstring); its deprecation notice is noise here.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            # Emitted for any PRESERVE+folding export; its concern (a module in training
            # mode) cannot apply because export_onnx insists on eval().
            warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
            torch.onnx.export(
                module,
                inputs,
                str(raw_path),
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        return onnx.load(str(raw_path))


def _export_dynamo(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> onnx.ModelProto:
    """Dynamo exporter without its optimizer, then only the clean-up that keeps BN intact."""
    if opset < DYNAMO_MIN_OPSET:
        raise ValueError(
            f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET} (got {opset}); "
            "use exporter='torchscript' for older opsets"
        )
    # Imported lazily: onnxscript is only needed on this path.
    from onnxscript import ir, optimizer, rewriter
    from onnxscript.rewriter.rules import common as rules

    dynamic_shapes = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            module,
            inputs,
            dynamo=True,
            optimize=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    model = program.model
    # Turn the run-time zero biases (Shape/Expand/CastLike) into constants, then drop them:
    # a bias-free layer then looks the same as from the TorchScript exporter, and the
    # wrongly shaped Conv3d zero bias disappears. No BN-fusion rule is applied.
    optimizer.fold_constants(model)
    model = rewriter.rewrite(
        model,
        pattern_rewrite_rules=[
            rules.remove_optional_bias_from_conv_rule,
            rules.remove_optional_bias_from_conv_transpose_rule,
            rules.remove_optional_bias_from_gemm_rule,
        ],
    )
    optimizer.remove_unused_nodes(model)
    return ir.serde.serialize_model(model)


def export_onnx(
    module: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    exporter: Exporter = "torchscript",
) -> Path:
    """Export ``module`` (in eval mode) to a single self-contained .onnx file at ``path``.

    Every BatchNorm layer stays a BatchNormalization node, so the file is an input for
    bnfold rather than an already-folded model. The result is checked with
    ``onnx.checker.check_model(full_check=True)`` and must hold at least as many
    BatchNormalization nodes as the module has BatchNorm layers (an unused BN layer
    would therefore be reported as folded). With ``dynamic_batch`` the first axis of
    every input and output is symbolic. Graph inputs are named ``input`` (or
    ``input_0``, ...) and outputs ``output`` (or ``output_0``, ...).
    Returns the path written.
    """
    if module.training:
        raise ValueError("export_onnx needs the module in eval() mode (BN must use running stats)")
    inputs = _as_tuple(example_inputs)
    input_names = _io_names("input", len(inputs))
    output_names = _io_names("output", _count_outputs(module, inputs))
    if exporter == "torchscript":
        model = _export_torchscript(module, inputs, input_names, output_names, opset, dynamic_batch)
    elif exporter == "dynamo":
        model = _export_dynamo(module, inputs, input_names, output_names, opset, dynamic_batch)
    else:
        raise ValueError(f"unknown exporter {exporter!r}; expected 'torchscript' or 'dynamo'")

    default_opset = next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None
    )
    if default_opset != opset:
        raise RuntimeError(f"exporter produced opset {default_opset}, requested {opset}")
    onnx.checker.check_model(model, full_check=True)
    batchnorm_layers = sum(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules())
    batchnorm_nodes = count_ops(model)["BatchNormalization"]
    if batchnorm_nodes < batchnorm_layers:
        raise RuntimeError(
            f"exporter folded BatchNorm: module has {batchnorm_layers} BatchNorm layers, "
            f"graph has {batchnorm_nodes} BatchNormalization nodes"
        )

    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(destination), save_as_external_data=False)
    return destination


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Build a reference model (randomized BN statistics) and export it to ONNX.",
    )
    parser.add_argument("name", nargs="?", help="reference model name (see --list)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the .onnx file")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and BN stats")
    parser.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch exporter to use (default: torchscript; dynamo needs --opset >= 18)",
    )
    parser.add_argument("--dynamic-batch", action="store_true", help="make the batch axis symbolic")
    parser.add_argument("--list", action="store_true", help="list reference models and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 for usage errors)."""
    from models.registry import REFERENCE_MODELS, build

    parser = _build_parser()
    arguments = parser.parse_args(argv)
    if arguments.list:
        width = max(len(name) for name in REFERENCE_MODELS)
        for name, spec in REFERENCE_MODELS.items():
            print(f"{name:<{width}}  {spec.description}")
        return 0
    if arguments.name is None:
        parser.print_usage(sys.stderr)
        print("error: NAME is required (or use --list)", file=sys.stderr)
        return 2
    if arguments.name not in REFERENCE_MODELS:
        known = ", ".join(REFERENCE_MODELS)
        print(f"error: unknown model {arguments.name!r}; known: {known}", file=sys.stderr)
        return 2
    output = arguments.output or Path(f"{arguments.name}.onnx")
    module, example_input = build(arguments.name, seed=arguments.seed)
    try:
        written = export_onnx(
            module,
            example_input,
            output,
            opset=arguments.opset,
            dynamic_batch=arguments.dynamic_batch,
            exporter=arguments.exporter,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    op_counts = count_ops(onnx.load(str(written)))
    print(
        f"wrote {written} ({arguments.name}, opset {arguments.opset}): "
        f"{op_counts['BatchNormalization']} BatchNormalization, "
        f"{op_counts['LayerNormalization']} LayerNormalization nodes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
