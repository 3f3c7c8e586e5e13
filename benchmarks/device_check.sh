#!/usr/bin/env bash
# The accelerator check in one command: tests, ViT-B/16 throughput against OpenCLIP with MFU, loss
# memory at 65,536 and the demo recipe, into OUT/device_check.json (benchmarks/device_check.py says
# what each stage does). About 4.5 minutes on a GPU machine; `--tiny` is the CPU version the test
# suite runs.
#
#   benchmarks/device_check.sh [--tiny] [--out DIR] [--budget SECONDS] [--loss-tests 'PYTEST ARGS'] ...
#
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/device_check.py "$@"
