"""How much does folding cost next to just reading and writing the model?

For each model, side by side in one run:
- ``load+save``: a fresh process doing plain ``onnx.load`` + ``onnx.save`` (the I/O floor);
- ``bnfold``: a fresh process running ``bnfold MODEL -o OUT --no-verify -q``;
- in-process stage times of bnfold as the CLI runs them: lazy load (with the checker), fold, save,
  and verification (both ONNX Runtime sessions and the comparison; ``--no-verify`` skips it all);
- ``bnfold verify MODEL FOLDED`` and ``bnfold MODEL -o OUT`` (verification on) in fresh processes:
  wall time and peak RSS, also per model size (the target: at most ~1.5x the model file);
- ``bnfold inspect MODEL`` in a fresh process: peak RSS (it loads lazily, like the fold).
Peak RSS is each child process's VmHWM. Ratios are what to read: machines here are shared.
The targets of issue 5: fold / load+save under 5% (and under 0.1 s on the VGG-11-BN-style model),
CLI time and peak RSS at most 1.2x those of load+save, and for a model over 2 GB with external data
a CLI peak RSS under 1 GB.

    python benchmarks/fold_speed.py                    # reference models, VGG-11-BN style, ~100 MB VGG
    python benchmarks/fold_speed.py --vgg-mb 530       # the large all-conv case of issue 5
    python benchmarks/fold_speed.py --external-gb 3    # also a 3 GB external-data model (needs ~12 GB disk)
    python benchmarks/fold_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN_IO = "import onnx; onnx.save(onnx.load(sys.argv[2]), sys.argv[3])"
PLAIN_IO_EXTERNAL = (
    "import onnx; onnx.save(onnx.load(sys.argv[2]), sys.argv[3], save_as_external_data=True, "
    "location=sys.argv[3].rsplit('/', 1)[-1] + '.data')"
)
BNFOLD_CLI = "from bnfold.cli import main; main(sys.argv[2:])"
# Runs the code in argv[1] and reports the process's own peak RSS. VmHWM starts afresh at exec;
# ru_maxrss does not (a child forked from this big parent would inherit the parent's peak).
MEASURED = """
import sys
try:
    exec(sys.argv[1])
finally:
    peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]
    sys.stderr.write('\\nPEAK_RSS_KB ' + peak.split()[1] + '\\n')
"""


def vgg_style_model(target_mb: float, path: Path, seed: int = 0) -> int:
    """Conv3x3 -> BN -> ReLU stacks of 512 channels until the weights reach ``target_mb``.

    Returns the number of BatchNormalization nodes. Built with onnx.helper, so torch is not needed.
    """
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    channels_in, current, index = 3, "input", 0
    per_conv_mb = 512 * 512 * 9 * 4 / 2**20
    layers = max(1, round(target_mb / per_conv_mb))
    for index in range(layers):
        channels_out = 64 if index == 0 else 512
        weight = rng.standard_normal((channels_out, channels_in, 3, 3), dtype=np.float32) * 0.02
        names = [f"w{index}", f"g{index}", f"b{index}", f"m{index}", f"v{index}"]
        values = [
            weight,
            rng.uniform(0.5, 1.5, channels_out).astype(np.float32),
            rng.standard_normal(channels_out).astype(np.float32) * 0.1,
            rng.standard_normal(channels_out).astype(np.float32) * 0.1,
            rng.uniform(0.5, 2.0, channels_out).astype(np.float32),
        ]
        initializers += [
            numpy_helper.from_array(value, name) for name, value in zip(names, values, strict=True)
        ]
        nodes += [
            helper.make_node(
                "Conv", [current, names[0]], [f"conv{index}"], pads=[1, 1, 1, 1], name=f"conv{index}"
            ),
            helper.make_node(
                "BatchNormalization", [f"conv{index}", *names[1:]], [f"bn{index}"], name=f"bn{index}"
            ),
            helper.make_node("Relu", [f"bn{index}"], [f"relu{index}"], name=f"relu{index}"),
        ]
        current, channels_in = f"relu{index}", channels_out
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["output"]))
    graph = helper.make_graph(
        nodes,
        "vgg_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels_in, 1, 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return layers


def vgg11_bn_style_model(path: Path, seed: int = 0) -> int:
    """VGG-11 with BN (torchvision's ``vgg11_bn`` layout, random weights): 8 Conv -> BN -> ReLU
    blocks with max pools, then three Gemm layers, about 531 MB, most of it in the Gemms. Returns 8."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current, channels_in, blocks = "input", 3, 0
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if width == "M":
            nodes.append(
                helper.make_node("MaxPool", [current], [f"pool{blocks}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            current = f"pool{blocks}"
            continue
        names = [f"conv{blocks}.w", *(f"bn{blocks}.{role}" for role in ("g", "b", "m", "v"))]
        values = [
            rng.standard_normal((width, channels_in, 3, 3), dtype=np.float32) * 0.05,
            rng.uniform(0.5, 1.5, width).astype(np.float32),
            rng.standard_normal(width).astype(np.float32) * 0.1,
            rng.standard_normal(width).astype(np.float32) * 0.1,
            rng.uniform(0.5, 2.0, width).astype(np.float32),
        ]
        initializers += [numpy_helper.from_array(v, n) for n, v in zip(names, values, strict=True)]
        nodes += [
            helper.make_node("Conv", [current, names[0]], [f"c{blocks}"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{blocks}", *names[1:]], [f"n{blocks}"]),
            helper.make_node("Relu", [f"n{blocks}"], [f"r{blocks}"]),
        ]
        current, channels_in, blocks = f"r{blocks}", width, blocks + 1
    nodes.append(helper.make_node("Flatten", [current], ["flat"]))
    current = "flat"
    for index, (inputs, outputs) in enumerate(((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000))):
        weight = rng.standard_normal((outputs, inputs), dtype=np.float32) * 0.01
        initializers += [
            numpy_helper.from_array(weight, f"fc{index}.w"),
            numpy_helper.from_array(np.zeros(outputs, np.float32), f"fc{index}.b"),
        ]
        output = "output" if index == 2 else f"fc{index}"
        nodes.append(helper.make_node("Gemm", [current, f"fc{index}.w", f"fc{index}.b"], [output], transB=1))
        if index < 2:
            nodes.append(helper.make_node("Relu", [output], [f"fc{index}.r"]))
            current = f"fc{index}.r"
    graph = helper.make_graph(
        nodes,
        "vgg11_bn_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1000])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return blocks


def vgg_style_external_model(target_gb: float, path: Path, seed: int = 0) -> int:
    """Conv3x3 (1024 channels, 36 MB each) -> BN -> ReLU stacks until the weights reach ``target_gb``,
    written with external data to ``PATH.data`` one weight at a time (never all in memory).

    Returns the number of BatchNormalization nodes.
    """
    channels = 1024
    rng = np.random.default_rng(seed)
    # One random block repeated: generating gigabytes of normals would dominate the benchmark.
    pattern = (rng.standard_normal(channels * channels * 9 // 16, dtype=np.float32) * 0.01).tobytes() * 16
    layers = max(1, round(target_gb * 2**30 / len(pattern)))
    data_name = path.name + ".data"
    nodes, initializers, current, offset = [], [], "input", 0
    with open(path.with_name(data_name), "wb") as data:
        for index in range(layers):
            weight = TensorProto(
                name=f"w{index}", data_type=TensorProto.FLOAT, dims=[channels, channels, 3, 3]
            )
            weight.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(len(pattern))),
            ):
                entry = weight.external_data.add()
                entry.key, entry.value = key, value
            data.write(pattern)
            offset += len(pattern)
            names = [f"w{index}", *(f"{role}{index}" for role in ("g", "b", "m", "v"))]
            stats = [
                rng.uniform(0.5, 1.5, channels),
                rng.standard_normal(channels) * 0.1,
                rng.standard_normal(channels) * 0.1,
                rng.uniform(0.5, 2.0, channels),
            ]
            initializers += [weight] + [
                numpy_helper.from_array(v.astype(np.float32), n)
                for n, v in zip(names[1:], stats, strict=True)
            ]
            nodes += [
                helper.make_node("Conv", [current, names[0]], [f"conv{index}"], pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", [f"conv{index}", *names[1:]], [f"bn{index}"]),
                helper.make_node("Relu", [f"bn{index}"], [f"relu{index}"]),
            ]
            current = f"relu{index}"
    shape = [1, channels, 2, 2]
    graph = helper.make_graph(
        nodes,
        "vgg_style_external",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    return layers


def timed_child(code: str, *arguments: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a fresh Python process running ``code``."""
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-c", MEASURED, code, *arguments], capture_output=True, text=True, cwd=ROOT
    )
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{code} {arguments} failed: {process.stderr[-2000:]}")
    peak_kb = int(process.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0])
    return elapsed, peak_kb / 1024


def stage_times(path: Path, output: Path, *, verify: bool = True) -> dict[str, float]:
    """In-process seconds of each stage, as ``bnfold MODEL -o OUTPUT`` runs them."""
    from bnfold import fold_onnx
    from bnfold.onnx.io import load_model, save_model
    from bnfold.verify import Verifier

    times = {}
    start = time.perf_counter()
    loaded = load_model(path, lazy=True)
    times["load"] = time.perf_counter() - start
    verifier = None
    if verify:  # the original runs (from its file) before the in-place fold, as the CLI does
        start = time.perf_counter()
        verifier = Verifier(path, provider="cpu")
        times["verify"] = time.perf_counter() - start
    start = time.perf_counter()
    result = fold_onnx(loaded.model, inplace=True)
    times["fold"] = time.perf_counter() - start
    times["folded"] = len(result.report.folded)
    if verifier is not None:
        start = time.perf_counter()
        times["passed"] = verifier.compare(result.model).passed
        times["verify"] += time.perf_counter() - start
    start = time.perf_counter()
    save_model(result.model, output, external_data=loaded.used_external_data or None)
    times["save"] = time.perf_counter() - start
    return times


def reference_models(directory: Path) -> list[tuple[str, Path]]:
    try:
        from models.export import export_onnx
        from models.registry import REFERENCE_MODELS, build
    except ImportError:  # torch missing: the synthetic model still runs
        return []
    paths = []
    for name in REFERENCE_MODELS:
        module, example = build(name)
        paths.append((name, export_onnx(module, example, directory / f"{name}.onnx")))
    return paths


def measure(name: str, path: Path, output: Path, *, external: bool = False) -> dict:
    plain_code = PLAIN_IO_EXTERNAL if external else PLAIN_IO
    plain_seconds, plain_rss = timed_child(plain_code, str(path), str(output))
    fold_seconds, fold_rss = timed_child(BNFOLD_CLI, str(path), "-o", str(output), "--no-verify", "-q")
    stages = stage_times(path, output, verify=not external)
    _, inspect_rss = timed_child(BNFOLD_CLI, "inspect", str(path))  # loads lazily, as the fold does
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    verify_seconds = verify_rss = verified_fold_rss = float("nan")
    if not external:  # `bnfold verify` on the pair, and a fold with verification, each in a fresh process
        verify_seconds, verify_rss = timed_child(BNFOLD_CLI, "verify", str(path), str(output), "-q")
        checked = output.with_name(output.stem + ".verified.onnx")
        _, verified_fold_rss = timed_child(BNFOLD_CLI, str(path), "-o", str(checked), "-q")
        checked.unlink(missing_ok=True)
    return {
        "model": name,
        "size_mb": size / 2**20,
        "bn_folded": stages["folded"],
        "plain_load_save_s": plain_seconds,
        "bnfold_cli_s": fold_seconds,
        "cli_time_ratio": fold_seconds / plain_seconds,
        "plain_peak_rss_mb": plain_rss,
        "bnfold_peak_rss_mb": fold_rss,
        "cli_rss_ratio": fold_rss / plain_rss,
        "load_s": stages["load"],
        "fold_s": stages["fold"],
        "fold_ratio": stages["fold"] / plain_seconds,
        "save_s": stages["save"],
        "verify_s": stages.get("verify", float("nan")),
        "verified": stages.get("passed", "skipped"),
        "verify_cli_s": verify_seconds,
        "verify_peak_rss_mb": verify_rss,
        # Per size only where the model outweighs the ~85 MB of a process with onnxruntime loaded.
        "verify_rss_per_size": verify_rss / (size / 2**20) if size >= 64 << 20 else float("nan"),
        "fold_verify_peak_rss_mb": verified_fold_rss,
        "fold_verify_rss_per_size": verified_fold_rss / (size / 2**20) if size >= 64 << 20 else float("nan"),
        "inspect_peak_rss_mb": inspect_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-mb", type=float, default=100.0, help="size of the all-conv VGG-style model")
    parser.add_argument(
        "--external-gb", type=float, default=None, help="also a model of this size with external data"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference models")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    arguments = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as temporary:
        directory = Path(temporary)
        models = [] if arguments.no_reference else reference_models(directory)
        vgg11_path = directory / "vgg11_bn_style.onnx"
        vgg11_bn_style_model(vgg11_path)
        models.append(("vgg11_bn_style", vgg11_path))
        vgg_path = directory / "vgg_style.onnx"
        vgg_style_model(arguments.vgg_mb, vgg_path)
        models.append((f"vgg_style_{arguments.vgg_mb:g}mb", vgg_path))
        for name, path in models:
            rows.append(measure(name, path, directory / f"{name}.folded.onnx"))
            (directory / f"{name}.folded.onnx").unlink(missing_ok=True)
        for _, path in models:
            path.unlink()
        if arguments.external_gb:
            external_dir = directory / "external"
            external_dir.mkdir()
            needed = arguments.external_gb * 2**30 * 4  # input, plain output, bnfold output, spill
            free = shutil.disk_usage(external_dir).free
            if free < needed:
                raise SystemExit(
                    f"--external-gb {arguments.external_gb:g} needs {needed / 2**30:.0f} GB free"
                )
            path = external_dir / "vgg_external.onnx"
            vgg_style_external_model(arguments.external_gb, path)
            rows.append(
                measure(
                    f"vgg_external_{arguments.external_gb:g}gb",
                    path,
                    external_dir / "folded.onnx",
                    external=True,
                )
            )
    columns = [
        ("model", "{}"),
        ("size_mb", "{:.1f}"),
        ("bn_folded", "{}"),
        ("plain_load_save_s", "{:.3f}"),
        ("bnfold_cli_s", "{:.3f}"),
        ("cli_time_ratio", "{:.2f}"),
        ("plain_peak_rss_mb", "{:.0f}"),
        ("bnfold_peak_rss_mb", "{:.0f}"),
        ("cli_rss_ratio", "{:.2f}"),
        ("load_s", "{:.3f}"),
        ("fold_s", "{:.4f}"),
        ("fold_ratio", "{:.3f}"),
        ("save_s", "{:.3f}"),
        ("verify_s", "{:.3f}"),
        ("verified", "{}"),
        ("verify_cli_s", "{:.2f}"),
        ("verify_peak_rss_mb", "{:.0f}"),
        ("verify_rss_per_size", "{:.2f}"),
        ("fold_verify_peak_rss_mb", "{:.0f}"),
        ("fold_verify_rss_per_size", "{:.2f}"),
        ("inspect_peak_rss_mb", "{:.0f}"),
    ]
    table = [[title for title, _ in columns]]
    table += [[fmt.format(row[title]) for title, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for position, line in enumerate(table):
        print(" | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if position == 0:
            print("-|-".join("-" * width for width in widths))
    print(
        "ratios: cli_time_ratio = bnfold CLI / plain load+save (wall), cli_rss_ratio = their peak RSS, "
        "fold_ratio = in-process fold step / plain load+save; verify_s = both sessions + compare "
        "(skipped for the external-data model); verify_peak_rss_mb = `bnfold verify MODEL FOLDED` and "
        "fold_verify_peak_rss_mb = `bnfold MODEL -o OUT` (with verification), each a fresh process, "
        "*_per_size = that peak / the model's size; inspect_peak_rss_mb = `bnfold inspect MODEL`"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
