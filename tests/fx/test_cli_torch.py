"""The ``bnfold`` command on PyTorch models (``.pt2`` and ``package.module:factory``) and its rule names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
import bnfold.fx  # noqa: E402
from bnfold.sources import TORCH_RULE_NAMES, is_torch_source  # noqa: E402
from bnfold.verify_inputs import shapes_text  # noqa: E402
from tests.builders import op_types, run  # noqa: E402
from tests.fx import nets  # noqa: E402
from tests.test_cli import in_process  # noqa: E402

FACTORY_MODULE = """
import torch
from torch import nn
from tests.fx import nets

def conv_bn():
    torch.manual_seed(0)  # the same weights on every call: the test rebuilds the model to compare
    return nets.randomized(nets.ConvBN()), torch.randn(2, 4, 5, 5)

def relu_then_bn():
    # The second BN follows a ReLU: neither backend can fold it; --rewrite-standalone-bn can.
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6))
    return nets.randomized(model), torch.randn(1, 4, 7, 7)

def no_inputs():
    return nets.randomized(nets.ConvBN())
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "cli_models.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_models"
    sys.modules.pop("cli_models", None)


def test_rule_names_listed_without_torch_match_the_backend() -> None:
    assert TORCH_RULE_NAMES == tuple(bnfold.fx.rule_names())


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("model.pt2", True),
        ("weights.pth", True),  # routed to the PyTorch loader, which refuses to unpickle it
        ("pkg.models:resnet", True),
        ("model.onnx", False),
        ("dir/model.onnx", False),
        ("a:model.onnx", False),  # an ONNX file, though it reads like a factory spec
    ],
)
def test_is_torch_source(spec: str, expected: bool) -> None:
    assert is_torch_source(spec) is expected


def test_factory_folds_exports_and_verifies(factory: str, tmp_path: Path) -> None:
    out, report = tmp_path / "folded.onnx", tmp_path / "report.json"
    ran = in_process(f"{factory}:conv_bn", "-o", out, "--report", report)
    assert ran.code == 0, ran.output
    assert "verification passed" in ran.stdout and f"wrote {out}" in ran.stdout
    model = onnx.load(str(out))
    assert "BatchNormalization" not in op_types(model)
    written = json.loads(report.read_text())
    assert written["source"] == f"{factory}:conv_bn"
    assert written["verification"]["passed"] is True
    # The file computes what the module computes.
    module, example = __import__(factory).conv_bn()
    with torch.no_grad():
        expected = module(example).numpy()
    (actual,) = run(model, {"input": example.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_pt2_with_input_shape(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    path = tmp_path / "model.pt2"
    dynamic = {"inputs": {0: torch.export.Dim("batch")}}
    program = torch.export.export(model, (torch.randn(2, 4, 5, 5),), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    out = tmp_path / "folded.onnx"
    ran = in_process(path, "-o", out, "--input-shape", "inputs=3,4,5,5", "-q", "--trust-pt2")
    assert ran.code == 0, ran.output
    assert ran.stdout == ""
    graph_input = onnx.load(str(out)).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [3, 4, 5, 5]

    # The spatial size was not exported as dynamic: the program's guard refuses it, in one line.
    ran = in_process(path, "-o", out, "--input-shape", "inputs=3,4,6,6", "--trust-pt2")
    assert ran.code == 2 and "does not run on --input-shape [[3, 4, 6, 6]]" in ran.stderr
    assert "Traceback" not in ran.output


def test_pt2_fold_names_its_source_in_the_provenance(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4, 5, 5),)), str(path))
    out, report = tmp_path / "folded.onnx", tmp_path / "report.json"

    ran = in_process(path, "-o", out, "--report", report, "-q", "--trust-pt2")

    assert ran.code == 0, ran.output
    metadata = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert metadata["bnfold.source"] == "model.pt2"
    assert metadata["bnfold.source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The counts are the report's (the torch fold's), the rule is on the Conv that absorbed the BN.
    assert json.loads(metadata["bnfold.summary"]) == json.loads(report.read_text())["summary"]
    assert metadata["bnfold.rules_applied"] == "conv-bn"
    (conv,) = [node for node in onnx.load(str(out)).graph.node if node.op_type == "Conv"]
    assert conv.doc_string.startswith("bnfold: absorbed BatchNorm2d") and "by conv-bn" in conv.doc_string


class RecordingProgress:
    """Records each step's text, and fails on a step begun inside another (a terminal shows one
    step per line, so steps must not nest)."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.open = False

    @contextlib.contextmanager
    def step(self, text: str):
        assert not self.open, f"{text!r} begun inside {self.steps[-1]!r}"
        self.steps.append(text)
        self.open = True
        try:
            yield
        finally:
            self.open = False


def test_progress_names_each_step_of_a_pytorch_fold(tmp_path: Path) -> None:
    path, out = tmp_path / "model.pt2", tmp_path / "folded.onnx"
    program = torch.export.export(nets.randomized(nets.ConvBN()), (torch.randn(2, 4, 5, 5),))
    torch.export.save(program, str(path))
    progress = RecordingProgress()

    result = bnfold.fold_file(path, out, trust_code=True, progress=progress, provider="cpu")

    assert result.written and result.verification
    runs = len(result.verification.runs)
    assert runs == 2
    assert progress.steps == [
        f"loading {path}",
        "folding in torch",
        "running the module on the verification inputs",
        "exporting to ONNX (torchscript exporter)",
        "folding the exported ONNX model",
        "verifying: loading the exported model into ONNX Runtime",
        *(
            f"verifying: run {number} of the exported model ({shapes_text(run['input_shapes'])})"
            for number, run in enumerate(result.verification.runs, 1)
        ),
        f"saving {out}",
    ]


def test_rewrite_standalone_bn_leaves_no_bn(factory: str, tmp_path: Path) -> None:
    kept, rewritten = tmp_path / "kept.onnx", tmp_path / "rewritten.onnx"
    assert in_process(f"{factory}:relu_then_bn", "-o", kept, "-q").code == 0
    assert op_types(onnx.load(str(kept))).count("BatchNormalization") == 1
    ran = in_process(f"{factory}:relu_then_bn", "-o", rewritten, "--rewrite-standalone-bn")
    assert ran.code == 0, ran.output
    assert "bn-to-affine" in ran.stdout
    types = op_types(onnx.load(str(rewritten)))
    assert "BatchNormalization" not in types and {"Mul", "Add"} <= set(types)


def test_inspect_a_torch_model_writes_nothing(factory: str, tmp_path: Path) -> None:
    ran = in_process("inspect", f"{factory}:relu_then_bn", "--json")
    assert ran.code == 0, ran.output
    report = json.loads(ran.stdout)
    assert [d["outcome"] for d in report["decisions"]] == ["folded", "kept"]
    assert list(tmp_path.iterdir()) == [tmp_path / "cli_models.py"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{factory}:no_inputs", "-o", "{tmp}/o.onnx"], "give --input-shape"),
        (["{factory}:missing", "-o", "{tmp}/o.onnx"], "has no attribute missing"),
        (["{tmp}/weights.pth", "-o", "{tmp}/o.onnx"], "does not unpickle"),
        (["{factory}:conv_bn", "-o", "{tmp}/o.onnx", "--simplify"], "--simplify works on ONNX models only"),
        (["{factory}:conv_bn", "-o", "{tmp}/o.onnx", "--skip-rule", "nope"], "Invalid value"),
    ],
)
def test_torch_source_errors_are_one_line(factory: str, tmp_path: Path, args, message) -> None:
    (tmp_path / "weights.pth").write_bytes(b"not opened")
    ran = in_process(*(arg.format(factory=factory, tmp=tmp_path) for arg in args))
    assert ran.code == 2, ran.output
    assert message in ran.stderr and "Traceback" not in ran.output
    assert not (tmp_path / "o.onnx").exists()


def test_pt2_output_over_its_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    program = torch.export.export(nets.randomized(nets.ConvBN()), (torch.randn(1, 4, 5, 5),))
    torch.export.save(program, str(path))
    before = path.read_bytes()
    ran = in_process(path, "-o", path)
    assert ran.code == 2 and "is the input model" in ran.stderr
    assert path.read_bytes() == before


def test_report_over_the_pt2_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    program = torch.export.export(nets.randomized(nets.ConvBN()), (torch.randn(1, 4, 5, 5),))
    torch.export.save(program, str(path))
    before = path.read_bytes()
    ran = in_process(path, "-o", tmp_path / "o.onnx", "--report", path)
    assert ran.code == 2 and "--report would overwrite the model" in ran.stderr
    assert path.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_torch_only_rule_on_an_onnx_model_is_a_usage_error(tmp_path: Path) -> None:
    from tests.builders import conv_bn_model

    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(model_path))
    ran = in_process(model_path, "-o", tmp_path / "o.onnx", "--skip-rule", "linear-bn")
    assert ran.code == 2 and "apply to PyTorch models only" in ran.stderr


def test_without_torch_a_torch_source_says_what_to_install(tmp_path: Path) -> None:
    # sys.modules["torch"] = None makes every `import torch` fail, as on a machine without it.
    code = (
        "import sys; sys.modules['torch'] = None; from bnfold.cli import main; "
        "main(['pkg.models:net', '-o', sys.argv[1]])"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2, completed.stderr
    assert "pip install 'bnfold[torch]'" in completed.stderr and "Traceback" not in completed.stderr
