#!/usr/bin/env bash
# The one prepared GPU run (see the developers' guide): environment, CUDA library, GPU tests, benchmarks.
# Everything it produces goes to $OUT (logs, JSON, summary.json); commit the JSON under benchmarks/results/.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the lent GPU (H100/H200: under 8 minutes)
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run     # on a CPU: checks the plan and runs the tiny preset
#
# The device has torch, triton, timm, transformers and safetensors but no diffusers and no network: carry the
# wheel, prepared here with
#   pip download --no-deps --only-binary=:all: diffusers -d .whl
# and name ".whl" in the run's `carry`. The project itself is used from the checkout (PYTHONPATH), not
# installed, so nothing needs a build backend.
set -uo pipefail
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && "$DRY" == 1 ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
: > "$OUT/steps.txt"

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record its exit status.
step() {
  local name=$1 limit=$2
  shift 2
  log "$name (limit ${limit}s): $*"
  if (( DRY )) && [[ "$name" != dry-* ]]; then
    echo "$name planned" >> "$OUT/steps.txt"
    return 0
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  log "$name: exit $rc"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
}

# 1. environment
log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true; } > "$OUT/nvidia-smi.txt"
"$PY" - > "$OUT/env.json" 2>&1 <<'PY'
import importlib, json, platform
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(),
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("triton", "diffusers", "transformers", "timm", "safetensors", "open_clip", "xformers"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:  # noqa: BLE001
        out[name] = f"missing ({type(e).__name__})"
print(json.dumps(out, indent=1))
PY
cat "$OUT/env.json" | tee -a "$OUT/gpu_check.log"

# 2. carried wheels (diffusers), installed without dependencies and without the network
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    step install-wheels 120 "$PY" -m pip install --no-deps --no-index .whl/*.whl
  else
    log "diffusers is missing and no .whl/ was carried: the tests and benchmarks below will fail"
  fi
fi

# 3. the CUDA library of the fused step (sm_90 for H100/H200; nvcc may be absent: then the cuda backend skips)
if command -v nvcc > /dev/null; then
  step build-cuda-lib 240 bash -c "cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build -j 8"
else
  log "no nvcc: skipping the CUDA library (the cuda backend's tests skip with a reason)"
fi

# 4. GPU tests: fused kernels (triton, cuda) vs torch, graph capture, graphed feedback gradient
step gpu-tests 240 "$PY" -m pytest -q -m gpu tests/test_ops_gpu.py tests/test_graphs.py
step triton-tests 120 "$PY" -m pytest -q tests/test_ops_triton.py

# 5. benchmarks: the fused step, then the end-to-end presets (fp16)
step bench-step 90 "$PY" benchmarks/bench_step.py --json "$OUT/bench_step-gpu.json"
step bench-sd15-256 200 "$PY" -m fgds_engine.cli bench --preset sd15-256 --batches 1 8 32 --feedback-every 5 1 \
  --dtype float16 --json "$OUT/bench-sd15-256-gpu.json"
step bench-sd15-512 200 "$PY" -m fgds_engine.cli bench --preset sd15-512 --batches 1 8 32 --feedback-every 5 \
  --dtype float16 --json "$OUT/bench-sd15-512-gpu.json"

# dry run: the same plan, and the tiny preset end to end on the CPU
if (( DRY )); then
  step dry-bench-tiny 300 "$PY" -m fgds_engine.cli bench --preset tiny --batches 1 2 --steps 3 --feedback-every 2 \
    --json "$OUT/bench-tiny-dry.json"
fi

"$PY" - "$OUT" "$DRY" "$START" <<'PY'
import json, sys, time
from pathlib import Path
out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, *rest = line.split()
    steps[name] = dict(kv.split("=") for kv in rest if "=" in kv) or {"status": " ".join(rest)}
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
summary = {"dry_run": dry, "seconds": int(time.time()) - start, "env": env, "steps": steps,
           "results": sorted(p.name for p in out.glob("*.json") if p.name not in ("env.json", "summary.json"))}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
log "done; everything is in $OUT"
