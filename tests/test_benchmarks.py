"""Smoke tests of benchmarks/: compare_tools.py's --quick path on one tiny synthetic model (no torch),
and zoo.py's helpers and measurement on a plain-torch model (no torchvision or timm).

Asserts tables' shapes and bnfold's own rows, never timings or the other tools' results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_tools.py"
EXPECTED_COLUMNS = [
    "model",
    "tool",
    "result",
    "BN left",
    "valid",
    "total s",
    "load s",
    "fold s",
    "save s",
    "peak MB",
    "err max×",
    "err mean×",
    "lat noopt ms ×orig",
    "lat default ms ×orig",
]


def test_compare_tools_quick_run_on_a_tiny_model(tmp_path: Path) -> None:
    json_path = tmp_path / "rows.json"
    process = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--models",
            "convtranspose_grouped_bn",
            "--json",
            str(json_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]

    table = [line for line in process.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == EXPECTED_COLUMNS

    rows = json.loads(json_path.read_text())["rows"]
    tools = [row["tool"] for row in rows]
    assert tools[:2] == ["load+save", "bnfold"]
    assert {"onnxoptimizer", "onnxsim", "onnxslim", "onnxscript", "ort-basic"} <= set(tools)
    assert all(row["model"] == "convtranspose_grouped_bn" for row in rows)
    # A tool that is missing is a row that says so, not a crash.
    assert all(row["result"] != "not installed" or "bn_left" not in row for row in rows)

    bnfold = rows[tools.index("bnfold")]
    assert bnfold["result"] == "ok"
    assert (bnfold["bn_in"], bnfold["bn_left"]) == (1, 0)
    assert bnfold["valid"] is True
    assert bnfold["error_ratio_max"] < 10
    bnfold_line = next(line for line in table if "| bnfold " in line)
    assert [cell.strip() for cell in bnfold_line.strip("|").split("|")][2:5] == ["ok", "0/1", "yes"]


# --------------------------------------------------------------------------------------------------
# benchmarks/zoo.py: its helpers, without torchvision or timm (the real-architecture run needs its
# own environment, benchmarks/zoo_env.sh, and is not part of the suite)
# --------------------------------------------------------------------------------------------------


def _load_zoo():
    """benchmarks/zoo.py as a module (benchmarks/ is not a package); registered so dataclasses work."""
    import importlib.util

    name = "bnfold_zoo_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _small_batchnorm_net():
    """Conv -> BN -> ReLU -> Conv -> BN subclass -> pool -> Linear -> BatchNorm1d (plain torch)."""
    import torch
    from torch import nn

    class BatchNormSubclass(nn.BatchNorm2d):  # like timm's BatchNormAct2d
        pass

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        BatchNormSubclass(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
    )


def test_zoo_randomizes_every_batchnorm_reproducibly_and_keeps_it_sane() -> None:
    torch = pytest.importorskip("torch")
    zoo = _load_zoo()
    first, second = _small_batchnorm_net(), _small_batchnorm_net()
    assert zoo.randomize_batchnorm(first, seed=3) == 3
    zoo.randomize_batchnorm(second, seed=3)
    layers = zoo.batchnorm_layers(first)
    assert len(layers) == 3  # the subclass is found too
    weights = torch.cat([layer.weight.detach() for layer in layers])
    for layer, twin in zip(layers, zoo.batchnorm_layers(second), strict=True):
        assert torch.equal(layer.running_var, twin.running_var)
        assert torch.equal(layer.weight, twin.weight)
        assert (layer.running_var > 0).all()
        # Nothing is left at its default, so no fold is an identity.
        assert not torch.any(layer.running_mean == 0)
        assert not torch.any(layer.running_var == 1)
        assert not torch.any(layer.bias == 0)
        assert torch.all((layer.weight.abs() >= 0.66) & (layer.weight.abs() <= 1.5))
    # Some channels get a negative scale (112 channels at 10%: none would be a 1e-5 event).
    assert (weights < 0).any() and (weights > 0).sum() > len(weights) // 2
    third = _small_batchnorm_net()
    zoo.randomize_batchnorm(third, seed=4)
    assert not torch.equal(zoo.batchnorm_layers(third)[0].weight, layers[0].weight)
    first.eval()
    assert torch.isfinite(first(torch.randn(2, 3, 8, 8))).all()


def test_zoo_calibration_sets_the_statistics_of_the_calibration_batch() -> None:
    torch = pytest.importorskip("torch")
    zoo = _load_zoo()
    model = _small_batchnorm_net()
    zoo.calibrate_batchnorm(model, (1, 3, 8, 8), seed=5, batch=4)
    assert not model.training
    first = zoo.batchnorm_layers(model)[0]
    assert first.momentum == 0.1  # restored
    data = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        normalized = model[1](model[0](data))  # eval mode: running statistics
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalized.var(dim=(0, 2, 3), unbiased=True) - 1).abs().max() < 1e-3


def test_zoo_measures_a_plain_torch_model_end_to_end() -> None:
    """The child's whole measurement (export, CLI, fold_module, float64 errors) on a model of our own."""
    pytest.importorskip("torch")
    zoo = _load_zoo()
    spec = zoo.ZooModel("small", "test", "plain", (1, 3, 8, 8), _small_batchnorm_net)
    row = zoo.measure_model(spec, seed=0, stats="calibrated", tools=False, timeout=120)
    assert "export_error" not in row and "onnx_error" not in row and "torch_error" not in row, row
    assert row["bn_nodes"] == 3 and row["onnx_bn"] == 3
    assert row["onnx_left"] == row["onnx_left_file"] == 0
    assert row["torch_left"] == 0
    assert row["export_path_left"] == 0 and row["export_path_verify_passed"] is True
    assert row["verify_passed"] is True
    # Folded in float64 and rounded once: about as exact as the unfolded model, nowhere near 10x off.
    assert 0 < row["onnx_err"] < 10 * row["onnx_err_base"]
    assert 0 < row["torch_err"] < 10 * row["torch_err_base"]


def _zoo_rows() -> list[dict]:
    ok = {
        "model": "net_a",
        "family": "ResNet",
        "input": "1x3x64x64",
        "status": "ok",
        "bn_nodes": 10,
        "onnx_left": 2,
        "onnx_left_file": 2,
        "torch_left": 4,
        "export_path_left": 1,
        "export_path_verify_passed": False,
        "onnx_reasons": {"no-foldable-producer": 2},
        "torch_reasons": {"producer-has-other-consumers": 3, "custom-forward": 1},
        "onnx_err": 2.0,
        "onnx_err_base": 4.0,
        "torch_err": 1.0,
        "torch_err_base": 1.0,
        "verify_passed": False,
        "verify_outputs": [{"name": "output", "atol": 1e-4, "needed_atol": 3e-4, "passed": False}],
        "others_left": {"onnxsim": 3, "onnxslim": "error"},
        "total_s": 12.3,
    }
    passing = {**ok, "model": "net_b", "bn_nodes": 5, "onnx_left": 0, "onnx_left_file": 0, "torch_left": 0}
    passing.update(onnx_reasons={}, torch_reasons={}, verify_passed=True, onnx_err=4.0)
    passing.update(export_path_left=0, export_path_verify_passed=True)
    passing["verify_outputs"] = [{"name": "output", "atol": 1e-4, "needed_atol": 5e-5, "passed": True}]
    crashed = {"model": "net_c", "status": "crash (exit -11)", "error": "Segmentation fault", "total_s": 1.0}
    exact = {"folded_rms": 1e-5, "original_rms": 2e-5, "usable": True, "passed": True}
    judged = {**passing, "model": "net_d", "verify_passed": True}
    judged["verify_outputs"] = [
        {"name": "output", "atol": 1e-4, "needed_atol": 3e-4, "within_tolerance": False, "exact": exact}
    ]
    return [ok, passing, crashed, judged]


def test_zoo_table_and_summary_without_torch() -> None:
    zoo = _load_zoo()
    rows = _zoo_rows()
    lines = zoo.render_table(rows).splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == zoo.TABLE_COLUMNS
    assert len(lines) == 2 + len(rows)
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(zoo.TABLE_COLUMNS) for row in cells)
    column = {name: index for index, name in enumerate(zoo.TABLE_COLUMNS)}
    first = cells[0]
    assert (first[column["BN"]], first[column["left ONNX"]], first[column["left torch"]]) == ("10", "2", "4")
    assert first[column["left torch→ONNX"]] == "1 (verify FAIL)"
    assert first[column["kept torch by reason"]] == "producer-has-other-consumers 3, custom-forward 1"
    assert first[column["err× ONNX"]] == "0.50"
    assert first[column["verify (defaults)"]] == "**FAIL** (3.0× atol)"
    assert first[column["left onnxsim/onnxslim/onnxoptimizer"]] == "3 / error / –"
    assert cells[1][column["verify (defaults)"]] == "pass"
    assert "crash (exit -11): Segmentation fault" in cells[2][column["kept ONNX by reason"]]
    # Over the float32 tolerance, passed by the float64 judgment: both are shown.
    assert cells[3][column["verify (defaults)"]] == "pass (3.0× atol; float64: 0.50× orig)"

    summary = zoo.summarize(rows)
    assert (summary["models"], summary["ran"], summary["failed"]) == (4, 3, ["net_c"])
    assert (summary["bn"], summary["left_onnx"], summary["left_torch"]) == (20, 2, 4)
    assert summary["verify_failures"] == ["net_a"]
    assert summary["over_tolerance"] == ["net_a", "net_d"]
    assert summary["torch_reasons"] == {"producer-has-other-consumers": 3, "custom-forward": 1}
    assert summary["onnx_err_ratio_geomean"] == pytest.approx((0.5 * 1.0 * 1.0) ** (1 / 3))
    text = zoo.render_summary(summary)
    assert "20 BatchNormalization nodes: 2 left by the ONNX path, 4 by the PyTorch path (1 after" in text
    assert "bnfold.export verification failed: net_a\n" in text + "\n"
    assert "did not run: net_c" in text

    # Without the other tools (--no-tools) their column is left out.
    bare = [{key: value for key, value in row.items() if key != "others_left"} for row in rows]
    header = zoo.render_table(bare).splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        column for column in zoo.TABLE_COLUMNS if not column.startswith("left onnxsim")
    ]


def test_zoo_lists_its_models_and_refuses_unknown_ones_without_torchvision() -> None:
    script = ROOT / "benchmarks" / "zoo.py"
    listing = subprocess.run(
        [sys.executable, str(script), "--list"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert len(names) >= 25 and {"resnet18", "vgg11_bn", "repvgg_a0", "levit_128s"} <= set(names)
    unknown = subprocess.run(
        [sys.executable, str(script), "--models", "resnet18,no_such_net"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "no_such_net" in unknown.stderr
