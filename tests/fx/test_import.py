"""`import bnfold` never imports torch; the PyTorch API loads on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_bnfold_does_not_import_torch() -> None:
    result = run_python(
        "import bnfold, bnfold.testing, sys; from bnfold import *; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'fold_module' in dir(bnfold); print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_api_is_loaded_lazily() -> None:
    pytest.importorskip("torch")
    result = run_python(
        "import bnfold, sys; f = bnfold.fold_module; e = bnfold.export; "
        "assert 'torch' in sys.modules; import bnfold.fx; assert f is bnfold.fx.fold_module; print('ok')"
    )
    assert result.returncode == 0, result.stderr


def test_missing_torch_is_a_missing_dependency_error() -> None:
    result = run_python(
        "import sys; sys.modules['torch'] = None\n"
        "import bnfold\n"
        "try:\n    bnfold.fold_module\nexcept bnfold.MissingDependencyError as error:\n    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "bnfold[torch]" in result.stdout


def test_unknown_attribute_is_still_an_attribute_error() -> None:
    import bnfold

    with pytest.raises(AttributeError, match="no attribute 'fold_everything'"):
        bnfold.fold_everything  # noqa: B018
