#!/usr/bin/env bash
# Make the real-architecture benchmark's own virtual environment (benchmarks/zoo.py).
# It is separate from the project's .venv: it needs torchvision and timm, which bnfold,
# its tests and CI do not. Usage: bash benchmarks/zoo_env.sh [VENV_DIR]
# (default: benchmarks/.zoo-venv). Then: VENV_DIR/bin/python benchmarks/zoo.py
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/benchmarks/.zoo-venv}"
python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxruntime onnxscript numpy click
# Optional comparison tools; the benchmark skips any that did not install.
"$venv/bin/python" -m pip install onnxsim onnxslim onnxoptimizer || echo "zoo_env: optional tools not installed (the benchmark skips them)"
"$venv/bin/python" -m pip install -e "$repo" --no-deps
echo "zoo_env: ready: $venv/bin/python $repo/benchmarks/zoo.py"
