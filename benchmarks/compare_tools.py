"""bnfold next to the other tools that fold BatchNorm in ONNX models, side by side in one run.

Tools: bnfold (Python API), onnxoptimizer (pass ``fuse_bn_into_conv``), onnxsim, onnxslim, the
onnxscript optimizer, and ONNX Runtime's basic-level graph optimization saved with
``optimized_model_filepath``. Each tool runs in a fresh child process per model, with a timeout.
Per tool and model the child reports load, fold (the tool's own step) and save times and its peak
RSS (``VmHWM``, which starts afresh at exec); this process then judges the output:

- ``BN left``: BatchNormalization nodes left (all graphs), out of the original's;
- ``valid``: ``onnx.checker.check_model(full_check=True)`` passes and ONNX Runtime can create a
  session (graph optimizations disabled, so the model is run as written);
- ``err×``: max (and mean) abs error of the output against a float64 reference, divided by the
  unfolded model's own error. The reference is the original model with every float tensor cast to
  float64, run by ``onnx.reference.ReferenceEvaluator`` (ONNX Runtime's CPU provider has no float64
  Conv). Outputs are run in ONNX Runtime with graph optimizations disabled;
- ``result``: ``ok``, ``WRONG`` (error > 10x the original's and > 1e-4 of the output's scale),
  ``invalid``, ``error``, ``crash``, ``timeout`` or ``not installed``;
- latency: median ONNX Runtime CPU latency of each output (``ms ×ratio`` to the original, timed in
  alternation with it), graph optimizations disabled ("as written") and at the default level (what
  ONNX Runtime makes of it anyway). Accuracy and latency are skipped above ``--numerics-max-mb``.

The ``load+save`` row is plain ``onnx.load`` + ``onnx.save`` in a fresh process (the I/O floor) and
carries the original model's error (1.00 by definition) and latency.

    python benchmarks/compare_tools.py                        # all models + a ~100 MB VGG-style model
    python benchmarks/compare_tools.py --vgg-mb 530 --external-gb 2.5 --json out.json   # issue 5's big cases
    python benchmarks/compare_tools.py --quick --models resnet_tiny --tools bnfold,onnxsim
    python benchmarks/compare_tools.py --list

(``--child`` is the internal entry point of the measured child processes.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

from fold_speed import vgg_style_external_model, vgg_style_model  # noqa: E402  (needs the path set above)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
RESULT_PREFIX = "RESULT "


# --------------------------------------------------------------------------------------------------
# Tools (run in the child process)
# --------------------------------------------------------------------------------------------------


class Stopwatch:
    """Named stage times, in seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = now - self._start
        self._start = now


def _save_onnx(model: onnx.ModelProto, target: str, external: bool) -> None:
    if external:
        onnx.save_model(
            model,
            target,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=Path(target).name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, target)


def _tool_plain(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    model = onnx.load(source)
    watch.lap("load_s")
    _save_onnx(model, target, external)
    watch.lap("save_s")
    return ""


def _tool_bnfold(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    from bnfold import fold_onnx
    from bnfold.onnx.io import load_model, save_model

    watch.lap("import_s")
    # As the CLI does: checked, weights left on disk until a fold needs them (lazy) and streamed on save.
    model = load_model(source, lazy=True).model
    watch.lap("load_s")
    result = fold_onnx(model, inplace=True)
    watch.lap("fold_s")
    save_model(result.model, target, external_data=True if external else None)
    watch.lap("save_s")
    return f"{len(result.report.folded)} folded"


def _tool_bnfold_cli(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    from bnfold.cli import main

    watch.lap("import_s")
    try:
        main([source, "-o", target, "--no-verify", "-q"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"bnfold CLI exited with {exit_.code}") from None
    watch.lap("fold_s")  # load + fold + save: the CLI does not report its stages
    return "CLI: fold_s is load+fold+save"


def _tool_onnxoptimizer(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    import onnxoptimizer

    watch.lap("import_s")
    model = onnx.load(source)
    watch.lap("load_s")
    optimized = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    watch.lap("fold_s")
    _save_onnx(optimized, target, external)
    watch.lap("save_s")
    return ""


def _tool_onnxsim(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    import onnxsim

    watch.lap("import_s")
    model = onnx.load(source)
    watch.lap("load_s")
    simplified, check_ok = onnxsim.simplify(model)
    watch.lap("fold_s")
    _save_onnx(simplified, target, external)
    watch.lap("save_s")
    return "" if check_ok else "onnxsim's own check failed"


def _tool_onnxslim(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    import onnxslim

    watch.lap("import_s")
    model = onnx.load(source)
    watch.lap("load_s")
    slimmed = onnxslim.slim(model)
    watch.lap("fold_s")
    _save_onnx(slimmed, target, external)
    watch.lap("save_s")
    return ""


def _tool_onnxscript(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    # The IR-based optimizer (constant folding + default rewrite rules, BN fusion among them),
    # used on its own IR: ir.load reads external data lazily, ir.save streams it.
    from onnxscript import ir, optimizer

    watch.lap("import_s")
    model = ir.load(source)
    watch.lap("load_s")
    optimizer.optimize(model)
    watch.lap("fold_s")
    ir.save(model, target, external_data=Path(target).name + ".data" if external else None)
    watch.lap("save_s")
    return ""


def _tool_ort_basic(source: str, target: str, external: bool, watch: Stopwatch) -> str:
    import onnxruntime as ort

    watch.lap("import_s")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = target
    if external:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", Path(target).name + ".data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    watch.lap("fold_s")
    return "fold_s is session creation: load + optimize + save"


@dataclass(frozen=True)
class Tool:
    name: str
    run: Callable[[str, str, bool, Stopwatch], str]
    module: str  # importable when the tool is installed
    distribution: str  # for the version
    default: bool = True


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("load+save", _tool_plain, "onnx", "onnx"),
        Tool("bnfold", _tool_bnfold, "bnfold", "bnfold"),
        Tool("bnfold-cli", _tool_bnfold_cli, "bnfold", "bnfold", default=False),
        Tool("onnxoptimizer", _tool_onnxoptimizer, "onnxoptimizer", "onnxoptimizer"),
        Tool("onnxsim", _tool_onnxsim, "onnxsim", "onnxsim"),
        Tool("onnxslim", _tool_onnxslim, "onnxslim", "onnxslim"),
        Tool("onnxscript", _tool_onnxscript, "onnxscript", "onnxscript"),
        Tool("ort-basic", _tool_ort_basic, "onnxruntime", "onnxruntime"),
    )
}


def child_main(tool_name: str, source: str, target: str, external: bool) -> None:
    """Run one tool once and print its stage times and this process's peak RSS as one JSON line."""
    watch = Stopwatch()
    note = TOOLS[tool_name].run(source, target, external, watch)
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(RESULT_PREFIX + json.dumps({**watch.times, "peak_rss_mb": peak_kb / 1024, "note": note}))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    name: str
    path: Path
    kind: str  # "reference", "variant", "failure-case", "large", "external"
    description: str
    external: bool = False
    judge_numerics: bool = True  # accuracy and latency (off for the biggest models)
    size_mb: float = 0.0


def _random_bn(rng: np.random.Generator, channels: int, prefix: str) -> list[TensorProto]:
    gamma = rng.uniform(0.5, 1.5, channels) * np.where(rng.random(channels) < 0.25, -1, 1)
    values = {
        f"{prefix}_scale": gamma,
        f"{prefix}_bias": rng.normal(0, 0.5, channels),
        f"{prefix}_mean": rng.normal(0, 0.5, channels),
        f"{prefix}_var": rng.uniform(0.5, 2.0, channels),
    }
    return [numpy_helper.from_array(value.astype(np.float32), name) for name, value in values.items()]


def _bn_node(prefix: str, source: str, output: str, **attributes) -> onnx.NodeProto:
    inputs = [source, *(f"{prefix}_{part}" for part in ("scale", "bias", "mean", "var"))]
    return helper.make_node("BatchNormalization", inputs, [output], name=prefix, **attributes)


def _save_small(nodes, inputs, outputs, initializers, path: Path, opset: int = 17) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def convtranspose_grouped_bn(path: Path, seed: int = 0) -> None:
    """Grouped ConvTranspose -> BN: weight [C_in, C_out/groups, k, k]; C_in != C_out exposes axis bugs."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32)  # groups=3 -> 9 output channels
    initializers = [
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(rng.normal(0, 0.3, 9).astype(np.float32), "bias"),
        *_random_bn(rng, 9, "bn"),
    ]
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["input", "weight", "bias"],
            ["deconv"],
            group=3,
            strides=[2, 2],
            output_padding=[1, 1],
            name="deconv",
        ),
        _bn_node("bn", "deconv", "normalized"),
        helper.make_node("Relu", ["normalized"], ["output"], name="relu"),
    ]
    _save_small(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 6, 5, 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 9, 12, 12])],
        initializers,
        path,
    )


def gemm_beta_bn(path: Path, seed: int = 0) -> None:
    """Gemm(alpha=0.7, beta=0.5, transB=1, C) -> BN over 2-D output: folding must keep alpha/beta."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "weight"),
        numpy_helper.from_array(rng.normal(0, 1.0, 8).astype(np.float32), "bias"),
        *_random_bn(rng, 8, "bn"),
    ]
    nodes = [
        helper.make_node(
            "Gemm", ["input", "weight", "bias"], ["linear"], alpha=0.7, beta=0.5, transB=1, name="gemm"
        ),
        _bn_node("bn", "linear", "output"),
    ]
    _save_small(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4, 8])],
        initializers,
        path,
    )


def bn_training_mode(path: Path, seed: int = 0) -> None:
    """Conv -> BN(training_mode=1): batch statistics at run time, so the right answer is to keep it."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32), "weight"),
        *_random_bn(rng, 6, "bn"),
    ]
    bn = _bn_node("bn", "conv", "normalized", training_mode=1)
    bn.output.extend(["running_mean_out", "running_var_out"])  # three outputs with training_mode=1
    nodes = [
        helper.make_node("Conv", ["input", "weight"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        bn,
        helper.make_node("Relu", ["normalized"], ["output"], name="relu"),
    ]
    _save_small(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 6, 8, 8])],
        initializers,
        path,
    )


def _bn_parameter_names(graph: onnx.GraphProto) -> set[str]:
    return {name for node in graph.node if node.op_type == "BatchNormalization" for name in node.input[1:5]}


def float16_mixed(source: Path, path: Path) -> None:
    """float16 data and weights, BN statistics kept float32 (legal from BatchNormalization-15)."""
    model = onnx.load(source)
    graph = model.graph
    keep = _bn_parameter_names(graph)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(attribute.t).astype(np.float16)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


FAILURE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "convtranspose_grouped_bn": (convtranspose_grouped_bn, "grouped ConvTranspose (groups=3, 6->9 ch) -> BN"),
    "gemm_beta_bn": (gemm_beta_bn, "Gemm alpha=0.7 beta=0.5 transB=1 -> BN"),
    "bn_training_mode": (bn_training_mode, "Conv -> BN training_mode=1 (correct: keep it)"),
}
FLOAT16_VARIANT = ("resnet_tiny", "resnet_tiny_fp16_mixed")


def reference_model_names() -> list[str]:
    try:
        from models.registry import REFERENCE_MODELS
    except ImportError:  # torch missing
        return []
    return list(REFERENCE_MODELS)


def available_models(vgg_mb: float, external_gb: float) -> list[str]:
    names = reference_model_names()
    if "resnet_tiny" in names:
        names.append(FLOAT16_VARIANT[1])
    names += list(FAILURE_CASES)
    if vgg_mb > 0:
        names.append(f"vgg_style_{vgg_mb:g}mb")
    if external_gb > 0:
        names.append(f"vgg_external_{external_gb:g}gb")
    return names


def build_model(name: str, directory: Path, arguments: argparse.Namespace) -> BenchModel:
    path = directory / f"{name}.onnx"
    if name in FAILURE_CASES:
        builder, description = FAILURE_CASES[name]
        builder(path)
        return BenchModel(name, path, "failure-case", description)
    if name == FLOAT16_VARIANT[1]:
        source = directory / "_resnet_tiny_fp32.onnx"
        _export_reference(FLOAT16_VARIANT[0], source)
        float16_mixed(source, path)
        return BenchModel(name, path, "variant", "resnet_tiny in float16, BN statistics float32 (BN-15)")
    if name.startswith("vgg_style_"):
        layers = vgg_style_model(arguments.vgg_mb, path)
        numerics = path.stat().st_size <= arguments.numerics_max_mb * 2**20
        return BenchModel(name, path, "large", f"{layers} x Conv3x3(512)->BN->ReLU", judge_numerics=numerics)
    if name.startswith("vgg_external_"):
        layers = vgg_style_external_model(arguments.external_gb, path)
        return BenchModel(
            name, path, "external", f"{layers} x Conv3x3(1024)->BN->ReLU, external data", True, False
        )
    from models.registry import REFERENCE_MODELS

    _export_reference(name, path)
    return BenchModel(name, path, "reference", REFERENCE_MODELS[name].description)


def _export_reference(name: str, path: Path) -> None:
    from models.export import export_onnx
    from models.registry import build

    module, example = build(name)
    export_onnx(module, example, path)


def model_size_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20


# --------------------------------------------------------------------------------------------------
# Judging (this process)
# --------------------------------------------------------------------------------------------------


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_nodes(subgraph)


def count_batchnorms(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(
        node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
        for node in all_nodes(model.graph)
    )


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float tensor (initializers, constants, I/O, Cast targets) as float64, for the reference."""
    model = onnx.ModelProto.FromString(model.SerializeToString())

    def convert(tensor: TensorProto) -> None:
        if tensor.data_type in FLOAT_TYPES and tensor.data_type != TensorProto.DOUBLE:
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)
            )

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            convert(tensor)
        for value in [*graph.input, *graph.output]:
            if value.type.tensor_type.elem_type in FLOAT_TYPES:
                value.type.tensor_type.elem_type = TensorProto.DOUBLE
        del graph.value_info[:]
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    convert(attribute.t)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                if node.op_type == "Cast" and attribute.name == "to" and attribute.i in FLOAT_TYPES:
                    attribute.i = TensorProto.DOUBLE

    visit(model.graph)
    return model


ACCURACY_DRAWS = 16  # seeded inputs per model under 16 MB for the error ratios (one for larger models)


def make_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = {}
    for index, value in enumerate(item for item in model.graph.input if item.name not in initializers):
        tensor_type = value.type.tensor_type
        shape = [dim.dim_value if dim.HasField("dim_value") else 1 for dim in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        inputs[value.name] = np.random.default_rng(seed + index).standard_normal(shape).astype(dtype)
    return inputs


def ort_session(path: Path, level: str = "disable", threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # ONNX Runtime's default level
    }[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_outputs(session, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    produced = [output.name for output in session.get_outputs()]
    # Tools keep the output names; fall back to position if one renamed them.
    wanted = [name if name in produced else produced[index] for index, name in enumerate(names)]
    return [np.asarray(value, dtype=np.float64) for value in session.run(wanted, inputs)]


@dataclass
class Reference:
    inputs: dict[str, np.ndarray]  # the first draw: also the latency input
    output_names: list[str]
    expected: list[np.ndarray]  # float64, every output of every draw
    draws: list[dict[str, np.ndarray]] = field(default_factory=list)
    original_max: float = 0.0
    original_mean: float = 0.0
    scale: float = 1.0
    notes: list[str] = field(default_factory=list)


def errors(actual: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float]:
    differences = np.concatenate([np.abs(a - e).ravel() for a, e in zip(actual, expected, strict=True)])
    return float(differences.max()), float(differences.mean())


def _grouped_conv_transpose():
    """onnx.reference's ConvTranspose, with groups done right.

    onnx 1.23's reference slices a grouped ConvTranspose weight along its output axis (the weight is
    ``[C_in, C_out/groups, k...]``), does not split the bias and stacks the groups wrongly, so it
    fails or is wrong for ``group > 1``. Here each group runs through the (correct) ``group=1`` path.
    """
    from onnx.reference.ops.op_conv_transpose import ConvTranspose

    class GroupedConvTranspose(ConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, **attributes):
            group = attributes.get("group") or 1
            if group == 1:
                return super()._run(X, W, B, **attributes)
            inputs_per_group = X.shape[1] // group
            outputs_per_group = W.shape[1]
            parts = []
            for index in range(group):
                channels = slice(index * inputs_per_group, (index + 1) * inputs_per_group)
                bias = None if B is None else B[index * outputs_per_group : (index + 1) * outputs_per_group]
                parts.append(super()._run(X[:, channels], W[channels], bias, **{**attributes, "group": 1})[0])
            return (np.concatenate(parts, axis=1),)

    GroupedConvTranspose.__name__ = "ConvTranspose"
    return GroupedConvTranspose


def make_reference(path: Path, draws: int = 1) -> Reference:
    """The float64 outputs for ``draws`` seeded inputs, and the unfolded model's own error on them.

    A tiny model's error on one input is a handful of float32 roundings: several draws make the
    error ratios mean something.
    """
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    inputs = [make_inputs(model, seed=1000 * draw) for draw in range(draws)]
    names = [output.name for output in model.graph.output]
    evaluator = ReferenceEvaluator(to_float64(model), new_ops=[_grouped_conv_transpose()])
    expected = []
    for feeds in inputs:
        outputs = evaluator.run(names, {name: value.astype(np.float64) for name, value in feeds.items()})
        expected += [np.asarray(value, dtype=np.float64) for value in outputs]
    reference = Reference(inputs[0], names, expected, inputs)
    reference.scale = max(float(np.abs(value).max()) for value in expected)
    reference.original_max, reference.original_mean = errors(
        outputs_of_draws(ort_session(path), reference), expected
    )
    return reference


def outputs_of_draws(session, reference: Reference) -> list[np.ndarray]:
    names = reference.output_names
    return [value for feeds in reference.draws for value in run_outputs(session, feeds, names)]


def paired_latency_ms(
    original: Path, candidate: Path, level: str, inputs, runs: int, warmup: int, threads: int
) -> tuple[float, float]:
    """Median latency (ms) of the original and of the candidate, timed in alternation.

    Alternating the two sessions run by run puts both under the same machine noise, so their ratio
    is meaningful even where the absolute numbers drift.
    """
    sessions = [ort_session(original, level, threads), ort_session(candidate, level, threads)]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, inputs)
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for session, times in zip(sessions, samples, strict=True):
            start = time.perf_counter()
            session.run(None, inputs)
            times.append(time.perf_counter() - start)
    original_ms, candidate_ms = (statistics.median(times) * 1e3 for times in samples)
    return original_ms, candidate_ms


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge(path: Path, bench: BenchModel, reference: Reference | None, arguments) -> dict:
    """BN count, validity, accuracy against the float64 reference, and latency of one output."""
    verdict: dict = {"bn_left": count_batchnorms(path)}
    problems = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
        verdict["checker"] = True
    except Exception as error:  # any checker failure is a finding
        verdict["checker"] = False
        problems.append(f"checker: {_one_line(error)}")
    session = None
    try:
        session = ort_session(path, threads=arguments.threads)
        verdict["ort_session"] = True
    except Exception as error:
        verdict["ort_session"] = False
        problems.append(f"onnxruntime: {_one_line(error)}")
    verdict["valid"] = verdict["checker"] and verdict["ort_session"]
    if reference is not None and session is not None:
        try:
            actual = outputs_of_draws(session, reference)
            error_max, error_mean = errors(actual, reference.expected)
            verdict.update(
                error_max=error_max,
                error_mean=error_mean,
                error_ratio_max=_ratio(error_max, reference.original_max),
                error_ratio_mean=_ratio(error_mean, reference.original_mean),
            )
            verdict["wrong"] = error_max > max(10 * reference.original_max, 1e-4 * reference.scale)
        except Exception as error:
            problems.append(f"run: {_one_line(error)}")
            verdict["wrong"] = True
    if reference is not None and session is not None and arguments.latency_runs > 0:
        for level in ("disable", "default"):
            try:
                original_ms, candidate_ms = paired_latency_ms(
                    bench.path,
                    path,
                    level,
                    reference.inputs,
                    arguments.latency_runs,
                    arguments.warmup,
                    arguments.threads,
                )
                verdict[f"latency_{level}_ms"] = candidate_ms
                verdict[f"latency_{level}_original_ms"] = original_ms
                verdict[f"latency_{level}_ratio"] = candidate_ms / original_ms
            except Exception as error:
                problems.append(f"latency ({level}): {_one_line(error)}")
    if problems:
        verdict["problems"] = problems
    return verdict


def _ratio(value: float, base: float) -> float:
    if base == 0:
        return 1.0 if value == 0 else float("inf")
    return value / base


def run_child(tool: str, source: Path, target: Path, external: bool, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", tool, str(source), str(target)]
    if external:
        command.append("--external")
    start = time.perf_counter()
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {
            "status": "timeout",
            "total_s": time.perf_counter() - start,
            "detail": f"killed after {timeout:g} s",
        }
    row: dict = {"total_s": time.perf_counter() - start}
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        return {**row, "status": "crash", "detail": f"killed by {name}"}
    if process.returncode != 0:
        lines = [line for line in process.stderr.strip().splitlines() if line.strip()]
        return {**row, "status": "error", "detail": _last_error(lines)}
    result_lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    row.update(json.loads(result_lines[-1][len(RESULT_PREFIX) :]))
    row["status"] = "ran"
    return row


def _last_error(lines: list[str]) -> str:
    """The exception line of a traceback (the last line that names an error), one line, trimmed."""
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "error" in line:
            text = line.strip()
            return text if len(text) <= 200 else text[:197] + "..."
    return lines[-1][:200] if lines else "no output"


def installed(tool: Tool) -> bool:
    return importlib.util.find_spec(tool.module) is not None


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def benchmark_model(bench: BenchModel, tools: list[str], directory: Path, arguments) -> list[dict]:
    bn_in = count_batchnorms(bench.path)
    reference = None
    reference_note = "" if bench.judge_numerics else "accuracy/latency skipped (size)"
    if bench.judge_numerics:
        try:
            reference = make_reference(bench.path, draws=ACCURACY_DRAWS if bench.size_mb < 16 else 1)
        except Exception as error:
            reference_note = f"no float64 reference: {_one_line(error)}"
    if bench.size_mb >= 10:  # untimed, so the first measured tool does not pay for a cold page cache
        run_child("load+save", bench.path, directory / "_warmup.onnx", bench.external, arguments.timeout)
        for leftover in (directory / "_warmup.onnx", directory / "_warmup.onnx.data"):
            leftover.unlink(missing_ok=True)
    rows = []
    for tool_name in tools:
        tool = TOOLS[tool_name]
        row = {
            "model": bench.name,
            "model_kind": bench.kind,
            "size_mb": bench.size_mb,
            "tool": tool_name,
            "bn_in": bn_in,
        }
        if not installed(tool):
            rows.append({**row, "result": "not installed"})
            continue
        target = directory / f"{bench.name}.{tool_name}.onnx"
        measured = run_child(tool_name, bench.path, target, bench.external, arguments.timeout)
        row.update(measured)
        if measured["status"] != "ran":
            row["result"] = measured["status"]
        elif not target.exists():
            row["result"] = "error"
            row["detail"] = "no output written"
        else:
            row.update(judge(target, bench, reference, arguments))
            if not row["valid"]:
                row["result"] = "invalid"
            elif row.get("wrong"):
                row["result"] = "WRONG"
            else:
                row["result"] = "ok"
        if reference_note:
            row["numerics_note"] = reference_note
        if reference is not None and tool_name == "load+save":
            row["original_error_max"] = reference.original_max
            row["original_error_mean"] = reference.original_mean
        for leftover in (target, target.with_name(target.name + ".data")):
            leftover.unlink(missing_ok=True)
        rows.append(row)
        print(f"  {bench.name:<26} {tool_name:<14} {row['result']}", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

COLUMNS = [
    ("model", "model"),
    ("tool", "tool"),
    ("result", "result"),
    ("BN left", "bn"),
    ("valid", "valid"),
    ("total s", "total_s"),
    ("load s", "load_s"),
    ("fold s", "fold_s"),
    ("save s", "save_s"),
    ("peak MB", "peak_rss_mb"),
    ("err max×", "error_ratio_max"),
    ("err mean×", "error_ratio_mean"),
    ("lat noopt ms ×orig", "latency_disable_ms"),
    ("lat default ms ×orig", "latency_default_ms"),
]


def _cell(row: dict, key: str) -> str:
    if key == "bn":
        return f"{row['bn_left']}/{row['bn_in']}" if "bn_left" in row else f"-/{row['bn_in']}"
    value = row.get(key)
    if value is None:
        return "-"
    if key == "valid":
        return "yes" if value else "NO"
    if key in ("total_s", "load_s", "fold_s", "save_s"):
        return f"{value:.2g}" if value < 0.01 else f"{value:.3g}" if value < 100 else f"{value:.0f}"
    if key == "peak_rss_mb":
        return f"{value:.0f}"
    if key.startswith("error_ratio"):
        return f"{value:.2f}" if value < 1e4 else f"{value:.1e}"
    if key.startswith("latency"):
        return f"{value:.3g} ×{row[key.replace('_ms', '_ratio')]:.2f}"
    return str(value)


def render_table(rows: list[dict]) -> str:
    header = [title for title, _ in COLUMNS]
    table = [header] + [[_cell(row, key) for _, key in COLUMNS] for row in rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(header))]
    lines = []
    for position, line in enumerate(table):
        cells = [
            cell.ljust(width) if index < 3 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if position == 0:
            lines.append(
                "|"
                + "|".join(
                    ("-" * (width + 1) + ":") if index >= 3 else "-" * (width + 2)
                    for index, width in enumerate(widths)
                )
                + "|"
            )
    return "\n".join(lines)


def render_notes(rows: list[dict], models: list[BenchModel]) -> str:
    lines = []
    for bench in models:
        lines.append(f"- {bench.name} ({bench.size_mb:.3g} MB): {bench.description}")
    seen = set()
    for row in rows:
        if row.get("numerics_note") and row["model"] not in seen:
            seen.add(row["model"])
            lines.append(f"- {row['model']}: {row['numerics_note']}")
        for text in [row.get("detail"), *row.get("problems", [])]:
            if text:
                lines.append(f"- {row['model']} / {row['tool']}: {text}")
    return "\n".join(lines)


def meta(arguments, command: list[str]) -> dict:
    memory = ""
    try:
        memory = (
            next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split(":")[1].strip()
        )
    except (OSError, StopIteration):
        pass
    return {
        "command": " ".join(command),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "memory": memory,
        "python": platform.python_version(),
        "versions": {
            name: version(name)
            for name in (
                "bnfold",
                "onnx",
                "onnxruntime",
                "numpy",
                "onnxoptimizer",
                "onnxsim",
                "onnxslim",
                "onnxscript",
                "onnx-ir",
                "torch",
            )
        },
        "latency": {
            "runs": arguments.latency_runs,
            "warmup": arguments.warmup,
            "intra_op_threads": arguments.threads,
        },
        "timeout_s": arguments.timeout,
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=None, help="comma-separated model names (see --list); default: all"
    )
    parser.add_argument(
        "--tools",
        default=None,
        help=f"comma-separated tools; default: {','.join(t for t in TOOLS if TOOLS[t].default)}",
    )
    parser.add_argument("--vgg-mb", type=float, default=100.0, help="size of the VGG-style model (0: none)")
    parser.add_argument(
        "--external-gb", type=float, default=0.0, help="also a model of this size with external data"
    )
    parser.add_argument(
        "--numerics-max-mb", type=float, default=1024.0, help="accuracy and latency only up to this size"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per tool and model")
    parser.add_argument(
        "--latency-runs", type=int, default=50, help="timed runs per latency (median); 0: none"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small models only, 5 latency runs, 120 s timeout"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write rows and run metadata as JSON")
    parser.add_argument(
        "--keep", type=Path, default=None, help="build the models in this folder and keep them"
    )
    parser.add_argument("--list", action="store_true", help="list models and tools, then exit")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--external", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.latency_runs, arguments.warmup = min(arguments.latency_runs, 5), 1
        arguments.timeout = min(arguments.timeout, 120.0)
        if "--vgg-mb" not in (argv if argv is not None else sys.argv):
            arguments.vgg_mb = 0.0
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        child_main(*arguments.child, arguments.external)
        return 0
    known = available_models(arguments.vgg_mb, arguments.external_gb)
    if arguments.list:
        print("models:", ", ".join(known))
        print(
            "tools: ",
            ", ".join(f"{name}{'' if tool.default else ' (opt-in)'}" for name, tool in TOOLS.items()),
        )
        return 0
    names = known if arguments.models is None else arguments.models.split(",")
    tools = (
        [name for name in TOOLS if TOOLS[name].default]
        if arguments.tools is None
        else arguments.tools.split(",")
    )
    unknown = [name for name in names if name not in known] + [name for name in tools if name not in TOOLS]
    if unknown:
        print(f"error: unknown model or tool {unknown}; see --list", file=sys.stderr)
        return 2
    if "load+save" not in tools:
        tools.insert(0, "load+save")  # the I/O floor and the original's own error/latency
    started = time.perf_counter()
    rows, built = [], []
    with tempfile.TemporaryDirectory(prefix="bnfold-compare-") as temporary:
        directory = arguments.keep or Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"building {name}", file=sys.stderr, flush=True)
            bench = build_model(name, directory, arguments)
            bench.size_mb = model_size_mb(bench.path)
            built.append(bench)
            rows += benchmark_model(bench, tools, directory, arguments)
            if arguments.keep is None:
                for leftover in (bench.path, bench.path.with_name(bench.path.name + ".data")):
                    leftover.unlink(missing_ok=True)
        notes = render_notes(rows, built)
    elapsed = time.perf_counter() - started
    command = ["python", "benchmarks/compare_tools.py", *(argv if argv is not None else sys.argv[1:])]
    print(render_table(rows))
    print()
    print(notes)
    print(
        f"\n{len(rows)} rows in {elapsed:.0f} s; latency: median of {arguments.latency_runs} runs, "
        f"{arguments.threads} intra-op thread(s), CPU provider"
    )
    if arguments.json:
        info = meta(arguments, command)
        info["elapsed_s"] = elapsed
        info["models"] = [
            {
                "name": bench.name,
                "kind": bench.kind,
                "description": bench.description,
                "size_mb": bench.size_mb,
            }
            for bench in built
        ]
        arguments.json.write_text(json.dumps({"meta": info, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
