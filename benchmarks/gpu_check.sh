#!/usr/bin/env bash
# The one prepared GPU run: the harvest driver (benchmarks/gpu/driver.py) with the project's Python.
# On the lent GPU (README "Running the GPU check" has the whole recipe; .whl/ from benchmarks/prepare_wheels.sh):
#   bash benchmarks/gpu_check.sh --wheels .whl --deadline 540     # $OUT gets harvest.tar.gz, summary.json, harvest.log
# On a CPU, the same plan to completion at small sizes (tests/test_harvest.py runs it), or at the real sizes
# (make dry-run):
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run [--dry-size real]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python && " $* " == *" --dry-run "* ]]; then
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu/driver.py "$@"
