"""How much does folding cost next to just reading and writing the model?

For each model, side by side in one run:
- ``load+save``: a fresh process doing plain ``onnx.load`` + ``onnx.save`` (the I/O floor);
- ``bnfold``: a fresh process running ``bnfold MODEL -o OUT --no-verify -q``;
- in-process stage times of bnfold: load (with checker), fold, save, and verification.
Peak RSS is each child process's ``ru_maxrss``. Ratios are what to read: machines here are shared.

    python benchmarks/fold_speed.py                 # reference models + a ~100 MB VGG-style model
    python benchmarks/fold_speed.py --vgg-mb 530    # the large case of issue 5
    python benchmarks/fold_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
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


def stage_times(path: Path, output: Path) -> dict[str, float]:
    from bnfold import fold_onnx, verify
    from bnfold.onnx.io import load_model, save_model

    times = {}
    start = time.perf_counter()
    loaded = load_model(path)
    times["load"] = time.perf_counter() - start
    original = loaded.model.SerializeToString()
    start = time.perf_counter()
    result = fold_onnx(loaded.model, inplace=True)
    times["fold"] = time.perf_counter() - start
    start = time.perf_counter()
    save_model(result.model, output)
    times["save"] = time.perf_counter() - start
    start = time.perf_counter()
    check = verify(original, result.model, provider="cpu")
    times["verify"] = time.perf_counter() - start
    times["folded"] = len(result.report.folded)
    times["passed"] = check.passed
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-mb", type=float, default=100.0, help="size of the VGG-style model")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    arguments = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as temporary:
        directory = Path(temporary)
        models = reference_models(directory)
        vgg_path = directory / "vgg_style.onnx"
        vgg_style_model(arguments.vgg_mb, vgg_path)
        models.append((f"vgg_style_{arguments.vgg_mb:g}mb", vgg_path))
        for name, path in models:
            output = directory / f"{name}.folded.onnx"
            plain_seconds, plain_rss = timed_child(PLAIN_IO, str(path), str(output))
            fold_seconds, fold_rss = timed_child(
                BNFOLD_CLI, str(path), "-o", str(output), "--no-verify", "-q"
            )
            stages = stage_times(path, output)
            rows.append(
                {
                    "model": name,
                    "size_mb": path.stat().st_size / 2**20,
                    "bn_folded": stages["folded"],
                    "plain_load_save_s": plain_seconds,
                    "bnfold_cli_s": fold_seconds,
                    "cli_time_ratio": fold_seconds / plain_seconds,
                    "plain_peak_rss_mb": plain_rss,
                    "bnfold_peak_rss_mb": fold_rss,
                    "load_s": stages["load"],
                    "fold_s": stages["fold"],
                    "save_s": stages["save"],
                    "verify_s": stages["verify"],
                    "verified": stages["passed"],
                }
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
        ("fold_s", "{:.4f}"),
        ("verify_s", "{:.3f}"),
        ("verified", "{}"),
    ]
    table = [[title for title, _ in columns]]
    table += [[fmt.format(row[title]) for title, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for position, line in enumerate(table):
        print(" | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if position == 0:
            print("-|-".join("-" * width for width in widths))
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
