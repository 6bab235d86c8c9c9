#!/usr/bin/env bash
# Set up a virtualenv and run the test suite (CPU, offline apart from the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZAYA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU wheel first: an open torch requirement would make the resolver fetch a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pytest -q -p no:cacheprovider modeling_tests "$@"
