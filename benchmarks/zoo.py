"""bnfold on real architectures from torchvision and timm: how many BatchNorms each path folds, why
the rest stay, how exact the folded models are, and whether default verification passes.

Every model is built with random init (no weight downloads) and every BatchNorm's affine
parameters randomized per channel (so no fold is an identity); its running statistics are then
measured on one random batch (so activations stay in a sane range through deep networks, as in a
trained model). ``--stats raw`` instead perturbs the default statistics (mean 0, variance 1) at
random: deep models then reach output scales of 1e4-1e16 (default tolerances scale with them).
Each model runs in its own child process with a timeout; in the child:

1. export to ONNX with every BN kept: ``torch.onnx.export(dynamo=False, opset 17,
   training=TrainingMode.PRESERVE, do_constant_folding=False)`` in eval mode;
2. ONNX path, as a user runs it: ``bnfold MODEL.onnx -o OUT.onnx --report R.json --force``
   (default options: verification on, default tolerances; ``--force`` only so that a model that
   fails verification is still written and its error can be measured);
3. PyTorch path: ``bnfold.fold_module(module, (x,))`` (verification in torch on), and
   ``bnfold.export(module, (x,), None)``: the torch fold, the export, the ONNX fold of what is left,
   verification against the module (what ``bnfold pkg.module:factory -o OUT.onnx`` does);
4. optionally the other ONNX tools (onnxsim, onnxslim, onnxoptimizer) when installed: BN left;
5. error against a float64 reference (the same torch module in ``.double()`` on the same inputs,
   4 random inputs by default):
   RMS error of each model over all outputs, reported as a ratio to the unfolded model's own
   RMS error (``err×``: 1.00 = as exact as the original; ONNX models run in ONNX Runtime with graph
   optimizations off, torch models in torch float32).

Needs its own environment (torchvision and timm): ``bash benchmarks/zoo_env.sh`` makes
``benchmarks/.zoo-venv``; then

    benchmarks/.zoo-venv/bin/python benchmarks/zoo.py                     # every model, a table
    benchmarks/.zoo-venv/bin/python benchmarks/zoo.py --models resnet18,repvgg_a0 --json rows.json
    benchmarks/.zoo-venv/bin/python benchmarks/zoo.py --list

(``--child`` is the internal entry point of the per-model child processes.) The helpers that do not
need torch (table, summary) and ``randomize_batchnorm`` (plain torch) are tested in
``tests/test_benchmarks.py`` without torchvision or timm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULT_PREFIX = "ZOO-RESULT "
OTHER_TOOLS = ("onnxsim", "onnxslim", "onnxoptimizer")


# --------------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One architecture: where it comes from, how to build it, and the input it runs on."""

    name: str
    library: str  # "torchvision" or "timm"
    family: str
    input_shape: tuple[int, ...]
    build: Callable[[], Any]


def _torchvision(factory: str, **kwargs: Any) -> Callable[[], Any]:
    def build():
        import torchvision

        return getattr(torchvision.models, factory)(weights=None, **kwargs)

    return build


def _torchvision_video(factory: str) -> Callable[[], Any]:
    def build():
        import torchvision

        return getattr(torchvision.models.video, factory)(weights=None)

    return build


def _torchvision_segmentation(factory: str, **kwargs: Any) -> Callable[[], Any]:
    """A segmentation model whose dict output ({'out': ...}) is returned as a plain tensor."""

    def build():
        import torch
        import torchvision

        model = getattr(torchvision.models.segmentation, factory)(
            weights=None, weights_backbone=None, **kwargs
        )

        class SegmentationOutput(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)["out"]

        return SegmentationOutput(model)

    return build


def _timm(factory: str, **kwargs: Any) -> Callable[[], Any]:
    def build():
        import timm

        return timm.create_model(factory, pretrained=False, **kwargs)

    return build


IMAGE_64 = (1, 3, 64, 64)
IMAGE_96 = (1, 3, 96, 96)

ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in [
        ZooModel("resnet18", "torchvision", "ResNet", IMAGE_64, _torchvision("resnet18")),
        ZooModel("resnext50_32x4d", "torchvision", "ResNeXt", IMAGE_64, _torchvision("resnext50_32x4d")),
        ZooModel("mobilenet_v2", "torchvision", "MobileNet", IMAGE_64, _torchvision("mobilenet_v2")),
        ZooModel(
            "mobilenet_v3_small", "torchvision", "MobileNet", IMAGE_64, _torchvision("mobilenet_v3_small")
        ),
        ZooModel("efficientnet_b0", "torchvision", "EfficientNet", IMAGE_64, _torchvision("efficientnet_b0")),
        ZooModel("regnet_x_400mf", "torchvision", "RegNet", IMAGE_64, _torchvision("regnet_x_400mf")),
        ZooModel("regnet_y_400mf", "torchvision", "RegNet", IMAGE_64, _torchvision("regnet_y_400mf")),
        ZooModel("densenet121", "torchvision", "DenseNet", IMAGE_64, _torchvision("densenet121")),
        ZooModel(
            "shufflenet_v2_x0_5", "torchvision", "ShuffleNet", IMAGE_64, _torchvision("shufflenet_v2_x0_5")
        ),
        ZooModel("mnasnet0_5", "torchvision", "MnasNet", IMAGE_64, _torchvision("mnasnet0_5")),
        ZooModel(
            "googlenet",
            "torchvision",
            "GoogLeNet",
            IMAGE_64,
            _torchvision("googlenet", aux_logits=False, init_weights=True, transform_input=False),
        ),
        ZooModel(
            "inception_v3",
            "torchvision",
            "Inception",
            (1, 3, 75, 75),
            _torchvision("inception_v3", aux_logits=False, init_weights=True, transform_input=False),
        ),
        ZooModel("vgg11_bn", "torchvision", "VGG-BN", (1, 3, 224, 224), _torchvision("vgg11_bn")),
        ZooModel("convnext_tiny", "torchvision", "ConvNeXt", IMAGE_64, _torchvision("convnext_tiny")),
        ZooModel("r3d_18", "torchvision", "R3D video", (1, 3, 4, 32, 32), _torchvision_video("r3d_18")),
        ZooModel(
            "lraspp_mobilenet_v3_large",
            "torchvision",
            "segmentation",
            IMAGE_64,
            _torchvision_segmentation("lraspp_mobilenet_v3_large"),
        ),
        ZooModel(
            "fcn_resnet50",
            "torchvision",
            "segmentation",
            IMAGE_64,
            _torchvision_segmentation("fcn_resnet50", aux_loss=False),
        ),
        ZooModel("ghostnet_100", "timm", "GhostNet", IMAGE_64, _timm("ghostnet_100")),
        ZooModel("repvgg_a0", "timm", "RepVGG", IMAGE_64, _timm("repvgg_a0")),
        ZooModel("mobileone_s0", "timm", "MobileOne", IMAGE_64, _timm("mobileone_s0")),
        ZooModel("levit_128s", "timm", "LeViT", (1, 3, 112, 112), _timm("levit_128s", img_size=112)),
        ZooModel("cspdarknet53", "timm", "CSPDarkNet", IMAGE_64, _timm("cspdarknet53")),
        ZooModel("rexnet_100", "timm", "ReXNet", IMAGE_64, _timm("rexnet_100")),
        ZooModel("lcnet_050", "timm", "LCNet", IMAGE_64, _timm("lcnet_050")),
        ZooModel("dpn68", "timm", "DPN", IMAGE_64, _timm("dpn68")),
        ZooModel("ese_vovnet19b_dw", "timm", "VoVNet", IMAGE_64, _timm("ese_vovnet19b_dw")),
        ZooModel("convmixer_768_32", "timm", "ConvMixer", IMAGE_64, _timm("convmixer_768_32")),
        ZooModel("resnetv2_50", "timm", "ResNetV2 (pre-act)", IMAGE_64, _timm("resnetv2_50")),
        ZooModel("hrnet_w18_small", "timm", "HRNet", IMAGE_64, _timm("hrnet_w18_small")),
        ZooModel("dla34", "timm", "DLA", IMAGE_64, _timm("dla34")),
        ZooModel("tf_efficientnet_b0", "timm", "EfficientNet (TF)", IMAGE_64, _timm("tf_efficientnet_b0")),
        ZooModel("regnety_002", "timm", "RegNet", IMAGE_64, _timm("regnety_002")),
    ]
}


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics (plain torch; tested without torchvision/timm)
# --------------------------------------------------------------------------------------------------


def batchnorm_layers(module) -> list:
    """Every BatchNorm layer of ``module`` (subclasses such as timm's BatchNormAct2d included)."""
    from torch import nn

    return [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]


def calibrate_batchnorm(module, input_shape: tuple[int, ...], seed: int, batch: int = 4) -> None:
    """Set every BN's running statistics to the batch statistics of one random batch.

    With random init and made-up statistics, activations grow or vanish layer after layer in deep
    networks (outputs of 1e4 to 1e10 measured here); statistics measured on data keep every layer
    normalized, as in a trained model. Run it after ``randomize_batchnorm`` (whose statistics it
    replaces), so that each BN's statistics match its input in the final network. Leaves
    ``module`` in eval mode.
    """
    import torch

    layers = batchnorm_layers(module)
    saved = [(layer, layer.momentum) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: one batch sets the statistics exactly
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn((batch, *input_shape[1:]), generator=generator)
    module.train()
    with torch.no_grad():
        module(data)
    for layer, momentum in saved:
        layer.momentum = momentum
    module.eval()


def randomize_batchnorm(module, seed: int, negative_fraction: float = 0.1) -> int:
    """Randomize every BN's affine parameters and perturb its running statistics, per channel.

    ``running_var`` is multiplied by a log-uniform factor in [1/2, 2] and ``running_mean`` shifted by
    up to 0.3 of the channel's standard deviation (no drift of the activation scale with depth);
    ``weight`` is ``exp(U(-0.4, 0.4))`` with a sign flipped in ``negative_fraction`` of the channels
    (real trained models have some negative gammas; rules around ReLU/MaxPool must not assume
    positive scales); ``bias`` is ``N(0, 0.2)``. Returns the number of BN layers changed.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    layers = batchnorm_layers(module)
    with torch.no_grad():
        for layer in layers:
            channels = layer.num_features

            def uniform(low: float, high: float, channels: int = channels) -> torch.Tensor:
                return low + (high - low) * torch.rand(channels, generator=generator, dtype=torch.float64)

            if layer.track_running_stats and layer.running_var is not None:
                variance = layer.running_var.double().clamp_min(1e-6) * torch.exp(
                    uniform(-math.log(2), math.log(2))
                )
                mean = layer.running_mean.double() + 0.3 * uniform(-1, 1) * variance.sqrt()
                layer.running_var.copy_(variance.to(layer.running_var.dtype))
                layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            if layer.affine:
                sign = torch.where(uniform(0, 1) < negative_fraction, -1.0, 1.0).double()
                weight = sign * torch.exp(uniform(-0.4, 0.4))
                bias = 0.2 * torch.randn(channels, generator=generator, dtype=torch.float64)
                layer.weight.copy_(weight.to(layer.weight.dtype))
                layer.bias.copy_(bias.to(layer.bias.dtype))
    return len(layers)


# --------------------------------------------------------------------------------------------------
# The child: one model, every measurement
# --------------------------------------------------------------------------------------------------


def _flat_outputs(value: Any) -> list:
    """The tensors of a (nested) output, in the order the exporters flatten them."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [tensor for item in value for tensor in _flat_outputs(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _flat_outputs(item)]
    return []


def _torch_outputs(module, inputs: list) -> list:
    """Every output of ``module`` on each of ``inputs`` (one list, input after input), as float64."""
    import torch

    with torch.no_grad():
        return [tensor.detach().double().numpy() for x in inputs for tensor in _flat_outputs(module(x))]


def rms_error(actual: list, expected: list) -> float:
    """Root-mean-square error over every element of every output (float64)."""
    import numpy as np

    squares = sum(
        float(np.sum((np.asarray(a, np.float64) - e) ** 2)) for a, e in zip(actual, expected, strict=True)
    )
    count = sum(int(np.asarray(e).size) for e in expected)
    return math.sqrt(squares / max(count, 1))


def max_error(actual: list, expected: list) -> float:
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - e))) for a, e in zip(actual, expected, strict=True)
    )


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None:
        return None
    if base == 0:
        return 1.0 if value == 0 else math.inf
    return value / base


def count_onnx_batchnorms(path: Path) -> int:
    """BatchNormalization nodes in every graph of the model (subgraphs included)."""
    import onnx

    def nodes(graph):
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attribute.g)
                for subgraph in attribute.graphs:
                    yield from nodes(subgraph)

    model = onnx.load(str(path), load_external_data=False)
    return sum(node.op_type == "BatchNormalization" for node in nodes(model.graph))


def ort_outputs(path: Path, inputs: list) -> list:
    """The model's outputs on each of ``inputs`` in ONNX Runtime (CPU, graph optimizations off: the
    model as written), one list, input after input."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [output for x in inputs for output in session.run(None, {name: x})]


def export_with_batchnorm(module, x, path: Path) -> None:
    """TorchScript exporter, eval mode, every BN kept as a node (see models/export.py and NOTES)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
        )


def kept_reasons(decisions: list[dict]) -> dict[str, int]:
    """Kept BNs counted by reason code."""
    counts = Counter(decision.get("reason") or "?" for decision in decisions if decision["outcome"] == "kept")
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def kept_examples(decisions: list[dict], per_reason: int = 3) -> dict[str, list[str]]:
    """A few kept BNs per reason, with the report's detail (what the lead reads to find patterns)."""
    examples: dict[str, list[str]] = {}
    for decision in decisions:
        if decision["outcome"] != "kept":
            continue
        bucket = examples.setdefault(decision.get("reason") or "?", [])
        if len(bucket) < per_reason:
            bucket.append(f"{decision['node']}: {decision.get('detail', '')}"[:300])
    return examples


def _bnfold_command() -> list[str]:
    script = Path(sys.executable).parent / "bnfold"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from bnfold.cli import main; sys.exit(main())"]


def run_onnx_path(
    source: Path, directory: Path, row: dict, inputs: list, reference: list | None, timeout: float
) -> None:
    """The CLI as a user runs it; BN left, reasons, verification, error of the written model."""
    folded = directory / "folded.onnx"
    report_path = directory / "report.json"
    start = time.perf_counter()
    process = subprocess.run(
        [*_bnfold_command(), str(source), "-o", str(folded), "--report", str(report_path), "--force", "-q"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    row["onnx_s"] = time.perf_counter() - start
    row["onnx_exit"] = process.returncode
    if process.returncode not in (0, 1):
        row["onnx_error"] = (process.stderr.strip().splitlines() or ["?"])[-1][:300]
        return
    report = json.loads(report_path.read_text())
    decisions = report["decisions"]
    row["onnx_bn"] = report["summary"]["batchnorm"]
    row["onnx_left"] = report["summary"]["kept"]
    row["onnx_left_file"] = count_onnx_batchnorms(folded)
    row["onnx_reasons"] = kept_reasons(decisions)
    row["onnx_kept_examples"] = kept_examples(decisions)
    verification = report.get("verification")
    if verification is not None:
        row["verify_passed"] = bool(verification["passed"])
        row["verify_outputs"] = [
            {
                key: output.get(key)
                for key in (
                    "name",
                    "max_abs_error",
                    "atol",
                    "rtol",
                    "needed_atol",
                    "passed",
                    "within_tolerance",
                    "decided_by",
                    "exact",
                    "note",
                )
                if key in output
            }
            for output in verification["outputs"]
        ]
        row["verify_notes"] = verification.get("notes", [])
        row["verify_mode"] = verification.get("mode")
        row["verify_reference"] = verification.get("reference")
    if reference is not None:
        folded_outputs = ort_outputs(folded, inputs)
        row["onnx_err"] = rms_error(folded_outputs, reference)
        row["onnx_err_max"] = max_error(folded_outputs, reference)


def run_torch_path(module, inputs: list, row: dict, reference: list | None, baseline: list | None) -> None:
    """bnfold.fold_module on the calibrated module; BN left, reasons, error of the folded module."""
    import bnfold

    start = time.perf_counter()
    result = bnfold.fold_module(module, (inputs[0],))
    row["torch_s"] = time.perf_counter() - start
    report = result.report.to_dict()
    row["torch_tracer"] = result.tracer
    row["torch_bn"] = report["summary"]["batchnorm"]
    row["torch_left"] = report["summary"]["kept"]
    row["torch_reasons"] = kept_reasons(report["decisions"])
    row["torch_kept_examples"] = kept_examples(report["decisions"])
    if result.verification is not None:
        row["torch_verify_passed"] = bool(result.verification.passed)
    if reference is not None:
        row["torch_err"] = rms_error(_torch_outputs(result.module, inputs), reference)
        row["torch_err_base"] = rms_error(baseline, reference) if baseline is not None else None


def run_torch_export(module, x, row: dict) -> None:
    """bnfold.export without writing (what ``bnfold pkg.module:factory -o OUT.onnx`` does): the torch
    fold, the export, the ONNX fold of what is left, verification against the module. BN left at the
    end, with reasons."""
    import bnfold

    start = time.perf_counter()
    result = bnfold.export(module, (x,), None)
    row["export_path_s"] = time.perf_counter() - start
    decisions = result.onnx_report.to_dict()["decisions"]
    row["export_path_left"] = sum(decision["outcome"] == "kept" for decision in decisions)
    row["export_path_reasons"] = kept_reasons(decisions)
    row["export_path_verify_passed"] = bool(result.passed)


_OTHER_TOOL_SCRIPT = """
import sys, onnx
source, target, tool = sys.argv[1:4]
model = onnx.load(source)
if tool == "onnxsim":
    import onnxsim
    model, _ = onnxsim.simplify(model)
elif tool == "onnxslim":
    import onnxslim
    model = onnxslim.slim(model)
elif tool == "onnxoptimizer":
    import onnxoptimizer
    model = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
onnx.save(model, target)
"""


def run_other_tools(source: Path, directory: Path, row: dict, timeout: float) -> None:
    """BN left by each installed other tool (each in its own process: some crash on some models)."""
    import importlib.util

    start = time.perf_counter()
    others: dict[str, Any] = {}
    for tool in OTHER_TOOLS:
        if importlib.util.find_spec(tool) is None:
            continue
        target = directory / f"{tool}.onnx"
        try:
            process = subprocess.run(
                [sys.executable, "-c", _OTHER_TOOL_SCRIPT, str(source), str(target), tool],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            others[tool] = "timeout"
            continue
        if process.returncode != 0:
            others[tool] = "error"
        else:
            others[tool] = count_onnx_batchnorms(target)
    row["others_left"] = others
    row["others_s"] = time.perf_counter() - start


def measure_model(
    spec: ZooModel,
    seed: int,
    stats: str,
    tools: bool,
    timeout: float,
    negative_fraction: float = 0.1,
    error_inputs: int = 4,
) -> dict:
    """Build, export, fold both ways and measure one model; returns its row."""
    import numpy as np
    import torch

    row: dict[str, Any] = {"model": spec.name, "library": spec.library, "family": spec.family}
    row["input"] = "x".join(map(str, spec.input_shape))
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = spec.build()
    row["bn_layers"] = randomize_batchnorm(module, seed + 1, negative_fraction)
    if stats == "calibrated":
        calibrate_batchnorm(module, spec.input_shape, seed)
    module.eval()
    # The first input drives export and folding; errors are measured over all of them (one input's
    # RMS error varies by 2x or more from input to input on sensitive models such as LeViT).
    inputs = [
        torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(seed + 2 + index))
        for index in range(error_inputs)
    ]
    x = inputs[0]
    row["build_s"] = time.perf_counter() - start

    baseline = _torch_outputs(module, inputs)
    try:
        import copy

        reference = _torch_outputs(copy.deepcopy(module).double(), [item.double() for item in inputs])
        row["output_scale"] = max(float(np.max(np.abs(output))) for output in reference)
    except Exception as error:  # a model that does not run in float64: no error ratios
        reference = None
        row["reference_error"] = f"{type(error).__name__}: {error}"[:200]

    with tempfile.TemporaryDirectory(prefix="bnfold-zoo-") as temporary:
        directory = Path(temporary)
        source = directory / f"{spec.name}.onnx"
        start = time.perf_counter()
        try:
            export_with_batchnorm(module, x, source)
        except Exception as error:
            row["export_error"] = f"{type(error).__name__}: {error}"[:300]
            return row
        row["export_s"] = time.perf_counter() - start
        row["bn_nodes"] = count_onnx_batchnorms(source)
        arrays = [item.numpy() for item in inputs]
        if reference is not None:
            original = ort_outputs(source, arrays)
            row["onnx_err_base"] = rms_error(original, reference)
            row["onnx_err_base_max"] = max_error(original, reference)
        try:
            run_onnx_path(source, directory, row, arrays, reference, timeout)
        except Exception as error:
            row["onnx_error"] = f"{type(error).__name__}: {error}"[:300]
        try:
            run_torch_path(module, inputs, row, reference, baseline)
        except Exception as error:
            row["torch_error"] = f"{type(error).__name__}: {error}"[:300]
        try:
            run_torch_export(module, x, row)
        except Exception as error:
            row["export_path_error"] = f"{type(error).__name__}: {error}"[:300]
        if tools:
            run_other_tools(source, directory, row, timeout)
    return row


# --------------------------------------------------------------------------------------------------
# The parent: one child per model, a table (no torch needed from here on)
# --------------------------------------------------------------------------------------------------


def run_child(name: str, arguments: argparse.Namespace) -> dict:
    """One model in a fresh process; a crash or timeout becomes a row that says so."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--seed",
        str(arguments.seed),
        "--stats",
        arguments.stats,
        "--timeout",
        str(arguments.timeout),
        "--negative-fraction",
        str(arguments.negative_fraction),
        "--error-inputs",
        str(arguments.error_inputs),
    ]
    if arguments.no_tools:
        command.append("--no-tools")
    start = time.perf_counter()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        process = subprocess.run(
            command, capture_output=True, text=True, timeout=arguments.timeout, env=environment, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "total_s": time.perf_counter() - start}
    elapsed = time.perf_counter() - start
    for line in reversed(process.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            row = json.loads(line[len(RESULT_PREFIX) :])
            row["status"] = "ok"
            row["total_s"] = elapsed
            return row
    tail = (process.stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1]
    return {
        "model": name,
        "status": f"crash (exit {process.returncode})",
        "error": tail[:300],
        "total_s": elapsed,
    }


def _format_reasons(reasons: dict[str, int] | None) -> str:
    if not reasons:
        return ""
    return ", ".join(f"{code} {count}" for code, count in reasons.items())


def _format_ratio(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}"


def _format_count(value: Any) -> str:
    return "–" if value is None else str(value)


def exact_ratio(row: dict) -> float | None:
    """The worst output's RMS error against bnfold's float64 reference, folded / original (from the
    verification report), or None when the reference was not computed."""
    ratios = []
    for output in row.get("verify_outputs", []):
        exact = output.get("exact") or {}
        if exact.get("usable") is False or exact.get("folded_rms") is None:
            continue
        ratios.append(ratio(exact["folded_rms"], exact.get("original_rms")))
    return max((value for value in ratios if value is not None), default=None)


def _verify_cell(row: dict) -> str:
    """pass / FAIL, how far over the plain tolerance, and the float64 judgment when it decided."""
    if row.get("onnx_error"):
        return "error"
    passed = row.get("verify_passed")
    if passed is None:
        return "–"
    outputs = row.get("verify_outputs", [])
    over = max(
        ((output.get("needed_atol") or 0.0) / output["atol"] for output in outputs if output.get("atol")),
        default=0.0,
    )
    within = all(output.get("within_tolerance", output.get("passed")) for output in outputs)
    exact = exact_ratio(row)
    if passed and within:
        return "pass"
    details = [] if within else [f"{over:.1f}× atol"]
    if exact is not None:
        details.append(f"float64: {exact:.2f}× orig")
    text = "pass" if passed else "**FAIL**"
    return f"{text} ({'; '.join(details)})" if details else text


def _others_cell(row: dict) -> str:
    others = row.get("others_left")
    if not others:
        return "–"
    return " / ".join(str(others.get(tool, "–")) for tool in OTHER_TOOLS)


TABLE_COLUMNS = [
    "model",
    "family",
    "input",
    "BN",
    "left ONNX",
    "left torch",
    "left torch→ONNX",
    f"left {'/'.join(OTHER_TOOLS)}",
    "kept ONNX by reason",
    "kept torch by reason",
    "err× ONNX",
    "err× torch",
    "verify (defaults)",
    "s",
]


def table_row(row: dict) -> list[str]:
    """One table line's cells from a row (a failed child still gets a line)."""
    if row.get("status") not in (None, "ok") or row.get("export_error"):
        problem = row.get("export_error") or row.get("error") or ""
        status = row.get("status", "ok") if not row.get("export_error") else "export failed"
        cells = [row["model"], row.get("family", ""), row.get("input", ""), "–", "–", "–", "–", "–"]
        cells += [f"{status}: {problem}"[:120], "", "–", "–", "–", f"{row.get('total_s', 0):.0f}"]
        return cells
    onnx_left = row.get("onnx_left")
    if row.get("onnx_error"):
        onnx_cell = f"error: {row['onnx_error']}"[:80]
    else:
        onnx_cell = _format_count(onnx_left)
        if row.get("onnx_left_file") not in (None, onnx_left):
            onnx_cell += f" (file: {row['onnx_left_file']})"
    torch_cell = (
        f"error: {row['torch_error']}"[:80]
        if row.get("torch_error")
        else _format_count(row.get("torch_left"))
    )
    if row.get("export_path_error"):
        export_cell = f"error: {row['export_path_error']}"[:80]
    else:
        export_cell = _format_count(row.get("export_path_left"))
        if row.get("export_path_verify_passed") is False:
            export_cell += " (verify FAIL)"
    return [
        row["model"],
        row.get("family", ""),
        row.get("input", ""),
        _format_count(row.get("bn_nodes")),
        onnx_cell,
        torch_cell,
        export_cell,
        _others_cell(row),
        _format_reasons(row.get("onnx_reasons")),
        _format_reasons(row.get("torch_reasons")),
        _format_ratio(ratio(row.get("onnx_err"), row.get("onnx_err_base"))),
        _format_ratio(ratio(row.get("torch_err"), row.get("torch_err_base"))),
        _verify_cell(row),
        f"{row.get('total_s', 0):.0f}",
    ]


def render_table(rows: list[dict]) -> str:
    """A markdown table, one line per model (the other tools' column only when they ran)."""
    shown = [
        index
        for index, column in enumerate(TABLE_COLUMNS)
        if not column.startswith("left onnxsim") or any(row.get("others_left") for row in rows)
    ]
    header = [TABLE_COLUMNS[index] for index in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = table_row(row)
        lines.append("| " + " | ".join(cells[index] for index in shown) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Totals over the rows that ran: BN, left per path, verification failures, failed models."""
    ran = [row for row in rows if row.get("status") == "ok" and not row.get("export_error")]
    onnx_reasons: Counter[str] = Counter()
    torch_reasons: Counter[str] = Counter()
    for row in ran:
        onnx_reasons.update(row.get("onnx_reasons") or {})
        torch_reasons.update(row.get("torch_reasons") or {})
    onnx_ratios = [ratio(row.get("onnx_err"), row.get("onnx_err_base")) for row in ran]
    onnx_ratios = [value for value in onnx_ratios if value is not None and 0 < value < math.inf]
    over_tolerance = [
        row["model"]
        for row in ran
        if not all(
            output.get("within_tolerance", output.get("passed")) for output in row.get("verify_outputs", [])
        )
    ]
    reference_seconds = {
        row["model"]: (row.get("verify_reference") or {}).get("seconds") or 0.0
        for row in ran
        if (row.get("verify_reference") or {}).get("computed")
    }
    return {
        "models": len(rows),
        "ran": len(ran),
        "failed": [row["model"] for row in rows if row not in ran],
        "bn": sum(row.get("bn_nodes") or 0 for row in ran),
        "left_onnx": sum(row.get("onnx_left") or 0 for row in ran),
        "left_torch": sum(row.get("torch_left") or 0 for row in ran),
        "left_torch_onnx": sum(row.get("export_path_left") or 0 for row in ran),
        "onnx_errors": [row["model"] for row in ran if row.get("onnx_error")],
        "torch_errors": [row["model"] for row in ran if row.get("torch_error")],
        "export_path_errors": [row["model"] for row in ran if row.get("export_path_error")],
        "export_path_verify_failures": [
            row["model"] for row in ran if row.get("export_path_verify_passed") is False
        ],
        "verify_failures": [row["model"] for row in ran if row.get("verify_passed") is False],
        "over_tolerance": over_tolerance,
        "reference_computed": len(reference_seconds),
        "reference_s_total": sum(reference_seconds.values()),
        "reference_s_max": max(reference_seconds.values(), default=0.0),
        "onnx_reasons": dict(onnx_reasons.most_common()),
        "torch_reasons": dict(torch_reasons.most_common()),
        "onnx_err_ratio_geomean": (
            math.exp(sum(math.log(value) for value in onnx_ratios) / len(onnx_ratios))
            if onnx_ratios
            else None
        ),
        "onnx_err_ratio_max": max(onnx_ratios, default=None),
        "total_s": sum(row.get("total_s") or 0 for row in rows),
    }


def render_summary(summary: dict[str, Any]) -> str:
    geomean = summary["onnx_err_ratio_geomean"]
    lines = [
        f"{summary['ran']}/{summary['models']} models ran; {summary['bn']} BatchNormalization nodes: "
        f"{summary['left_onnx']} left by the ONNX path, {summary['left_torch']} by the PyTorch path "
        f"({summary['left_torch_onnx']} after bnfold.export's ONNX fold); "
        f"verification (defaults) failed on {len(summary['verify_failures'])}"
        + (f" ({', '.join(summary['verify_failures'])})" if summary["verify_failures"] else "")
        + f"; {summary['total_s']:.0f} s",
        f"kept by the ONNX path: {_format_reasons(summary['onnx_reasons']) or 'none'}",
        f"kept by the PyTorch path: {_format_reasons(summary['torch_reasons']) or 'none'}",
    ]
    if summary.get("over_tolerance") or summary.get("reference_computed"):
        lines.append(
            f"over the plain float32 tolerance on {len(summary['over_tolerance'])} "
            f"({', '.join(summary['over_tolerance']) or 'none'}); bnfold's float64 reference computed on "
            f"{summary['reference_computed']} models, {summary['reference_s_total']:.1f} s in all, "
            f"at most {summary['reference_s_max']:.1f} s"
        )
    if geomean is not None:
        lines.append(
            f"ONNX path err× (RMS vs float64, folded / unfolded): geometric mean {geomean:.3f}, "
            f"max {summary['onnx_err_ratio_max']:.2f}"
        )
    if summary["failed"]:
        lines.append(f"did not run: {', '.join(summary['failed'])}")
    export_errors = summary.get("export_path_errors", [])
    if summary["onnx_errors"] or summary["torch_errors"] or export_errors:
        lines.append(
            f"bnfold errors: ONNX {summary['onnx_errors']}, torch {summary['torch_errors']}, "
            f"bnfold.export {export_errors}"
        )
    if summary.get("export_path_verify_failures"):
        lines.append(
            f"bnfold.export verification failed: {', '.join(summary['export_path_verify_failures'])}"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "onnx", "onnxruntime", *OTHER_TOOLS):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--json", type=Path, help="write the rows and the summary as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stats",
        choices=["calibrated", "raw"],
        default="calibrated",
        help="BN running statistics: measured on a random batch (default), or perturbed defaults",
    )
    parser.add_argument(
        "--negative-fraction",
        type=float,
        default=0.1,
        help="fraction of BN channels with a negative scale (default 0.1; 0 lets pooling rules fold)",
    )
    parser.add_argument(
        "--error-inputs", type=int, default=4, help="random inputs the errors are measured over (default 4)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    parser.add_argument("--no-tools", action="store_true", help="skip onnxsim/onnxslim/onnxoptimizer")
    parser.add_argument(
        "--from-json", type=Path, help="print the table and summary of an earlier --json file"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        import torch

        torch.set_num_threads(1)
        spec = ZOO[arguments.child]
        row = measure_model(
            spec,
            arguments.seed,
            arguments.stats,
            not arguments.no_tools,
            arguments.timeout,
            arguments.negative_fraction,
            arguments.error_inputs,
        )
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return 0
    if arguments.from_json:
        rows = json.loads(arguments.from_json.read_text())["rows"]
        print(render_table(rows))
        print()
        print(render_summary(summarize(rows)))
        return 0
    if arguments.list:
        for model in ZOO.values():
            shape = "x".join(map(str, model.input_shape))
            print(f"{model.name:<28} {model.library:<12} {model.family:<20} {shape}")
        return 0
    names = list(ZOO) if not arguments.models else [name.strip() for name in arguments.models.split(",")]
    unknown = [name for name in names if name not in ZOO]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        row = run_child(name, arguments)
        rows.append(row)
        print(f"{name}: {row.get('status')} in {row.get('total_s', 0):.0f} s", file=sys.stderr, flush=True)
    summary = summarize(rows)
    print(render_table(rows))
    print()
    print(render_summary(summary))
    if arguments.json:
        payload = {"meta": {"versions": _versions(), "argv": sys.argv[1:], "machine": platform.machine()}}
        payload.update(rows=rows, summary=summary)
        arguments.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
