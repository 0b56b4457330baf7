#!/usr/bin/env bash
# Fresh machine -> the whole test suite: install bnfold with every extra and the dev tools, lint,
# type-check the public API (tests/typing/public_api.py),
# then run pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k conv`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[torch,simplify,dev]' 'torch==2.13.0'
.venv/bin/ruff check .
.venv/bin/mypy  # the public API as a typed pipeline uses it ([tool.mypy] in pyproject.toml)
.venv/bin/python -m pytest "$@"
