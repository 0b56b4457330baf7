"""load_torch_source: .pt2 programs and package.module:factory specs, with one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import BnfoldError, InputSpecError, ModelLoadError, Outcome  # noqa: E402
from bnfold.fx import load_torch_source  # noqa: E402
from tests.fx import nets  # noqa: E402

FACTORY_MODULE = """
import torch
from tests.fx import nets

def model():
    return nets.randomized(nets.ConvBN())

def model_and_inputs():
    return nets.randomized(nets.ConvBN()), torch.randn(1, 4, 5, 5)

def broken():
    raise RuntimeError("no weights here")

not_callable = 3

def not_a_module():
    return "hello"
"""


@pytest.fixture
def factory_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_models.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_models"
    sys.modules.pop("user_models", None)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_pt2_round_trip(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    example = torch.randn(2, 4, 5, 5)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(path))

    module, inputs = load_torch_source(str(path), trust_code=True)
    assert torch.equal(inputs[0], example), "the example inputs saved with the program"
    result = bnfold.fold_module(module, inputs)
    assert [(d.node, d.outcome) for d in result.report.decisions] == [("bn", Outcome.FOLDED)]
    assert result.verification

    _, shaped = load_torch_source(str(path), {"inputs": [2, 4, 5, 5]}, trust_code=True)
    assert shaped[0].shape == (2, 4, 5, 5)


def test_factory_specs(factory_package: str) -> None:
    module, inputs = load_torch_source(f"{factory_package}:model", {"inputs": [3, 4, 5, 5]})
    assert isinstance(module, nets.ConvBN) and inputs[0].shape == (3, 4, 5, 5)
    module, inputs = load_torch_source(f"{factory_package}:model_and_inputs")
    assert inputs[0].shape == (1, 4, 5, 5)
    module, inputs = load_torch_source(f"{factory_package}:model", [[1, 4, 6, 6]])
    assert inputs[0].shape == (1, 4, 6, 6)


@pytest.mark.parametrize(
    ("spec", "shapes", "error", "message"),
    [
        ("missing.pt2", None, ModelLoadError, "missing.pt2: no such file"),
        ("weights.pt", None, ModelLoadError, "does not unpickle"),
        ("model.onnx", None, ModelLoadError, "expected a torch.export file"),
        ("no_such_package_xyz:model", None, ModelLoadError, "cannot import no_such_package_xyz"),
        ("{pkg}:absent", None, ModelLoadError, "has no attribute absent"),
        ("{pkg}:not_callable", None, ModelLoadError, "not_callable is not callable"),
        ("{pkg}:broken", None, ModelLoadError, "broken() raised RuntimeError: no weights here"),
        ("{pkg}:not_a_module", None, ModelLoadError, "returned str; expected a torch.nn.Module"),
        ("{pkg}:model", None, InputSpecError, "give input_shapes for ['inputs']"),
        ("{pkg}:model", {"x": [1, 4, 5, 5]}, InputSpecError, "unknown input(s) ['x']"),
    ],
)
def test_bad_sources_are_one_line_errors(factory_package, spec, shapes, error, message) -> None:
    with pytest.raises(error) as caught:
        load_torch_source(spec.format(pkg=factory_package), shapes)
    assert message in one_line(caught)
    assert isinstance(caught.value, BnfoldError)


def test_corrupt_pt2_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a torch.export archive") as caught:
        load_torch_source(str(garbage), trust_code=True)
    one_line(caught)
    import zipfile

    fake = tmp_path / "fake.pt2"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(ModelLoadError, match="cannot load the exported program") as caught:
        load_torch_source(str(fake), trust_code=True)
    one_line(caught)
    with pytest.raises(ModelLoadError, match="is a directory"):
        (tmp_path / "dir.pt2").mkdir()
        load_torch_source(str(tmp_path / "dir.pt2"))
