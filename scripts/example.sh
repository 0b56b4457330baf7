#!/usr/bin/env bash
# Fresh machine -> a folded, verified model: install bnfold with its PyTorch extra, build the
# ResNet-style reference model from models/, export it to ONNX with its BatchNorm nodes kept,
# fold it, verify it in ONNX Runtime and print the report. Outputs land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch is pinned here, not in pyproject: 2.13.0 is the CPU build these machines install from disk.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[torch]' 'torch==2.13.0'
mkdir -p out
.venv/bin/python -m models.export resnet_tiny -o out/resnet_tiny.onnx
.venv/bin/bnfold out/resnet_tiny.onnx -o out/resnet_tiny.folded.onnx --report out/resnet_tiny.report.json
