"""The wheel as users install it: bnfold alone at the top level (no `models` package shadowing the
users' own models/ folders), its type marker, and the license its metadata declares."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_bnfold_typed_and_licensed_and_no_models_package(tmp_path):
    # Built from a copy of the tree (models/ included, so leaving it out is what is tested), so the
    # build leaves nothing in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("bnfold", "models"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("bnfold-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
        headers = archive.read(metadata).decode()
        license_text = archive.read(
            next(name for name in names if name.endswith("licenses/LICENSE"))
        ).decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"bnfold", wheel.name.split("-py3")[0] + ".dist-info"}, sorted(top_level)
    assert "bnfold/py.typed" in names and "bnfold/cli.py" in names
    assert "License-Expression: MIT" in headers
    assert license_text.startswith("MIT License") and "bnfold contributors" in license_text
