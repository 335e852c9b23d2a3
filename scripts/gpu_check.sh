#!/usr/bin/env bash
# Everything the GPU can tell us, in order of value, within one time budget (docs/development.md):
#
#   OUT=gpu-out bash scripts/gpu_check.sh        # GPU_CHECK_SECONDS=540 by default
#
# 0. the machine: nvidia-smi, nvcc, torch, the Python packages (env.txt)
# 1. packages carried in .whl/ (scripts/gpu_wheels.sh) installed into /tmp/site without an index
# 2. scripts/gpu_smoke.py: FlashInfer against the torch executor on the default model, the JIT's
#    first-call time, fp8 pages at head dim 128 (smoke.json)
# 3. scripts/bench.py on CUDA in bf16: summarize and wide-beam, stock against paged (bench.json)
# 4. the GPU tests, the generate() ones first, then the rest, as long as the budget lasts
#    (gpu-tests-*.xml)
#
# Each stage runs under what is left of the budget and writes into $OUT as it goes, so a run cut
# short still returns what it got. The log of everything is $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
exec > >(tee -a "$OUT/log.txt") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

echo "== 0. machine ($(date -u +%FT%TZ), budget ${BUDGET} s)"
{ nvidia-smi; nvcc --version; "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== 1. carried packages"
if [ -d "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  [ -f "$WHEELS/flashinfer.tar.xz" ] && tar -xJf "$WHEELS/flashinfer.tar.xz" -C /tmp/site
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's hf_paged, not an installed one
"$PYTHON" -c "import torch, transformers, hf_paged; print('transformers', transformers.__version__)
try:
    import flashinfer; print('flashinfer', flashinfer.__version__)
except Exception as e: print('flashinfer does not import:', type(e).__name__, e)" | tee -a "$OUT/env.txt"
"$PYTHON" -m pip list 2>/dev/null > "$OUT/pip-list.txt"

echo "== 2. smoke ($(left) s left)"
timeout "$(left)" "$PYTHON" scripts/gpu_smoke.py --json "$OUT/smoke.json"
echo "smoke exit $?"

echo "== 3. bench ($(left) s left)"
if [ "$(left)" -gt 120 ]; then
  timeout "$(left)" "$PYTHON" scripts/bench.py --device cuda --dtype bfloat16 --workload summarize,wide-beam --reps 3 \
    --json "$OUT/bench.json"
  echo "bench exit $?"
fi

echo "== 4. GPU tests ($(left) s left)"
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" "$PYTHON" -m pytest -m gpu -v -ra -p no:cacheprovider --junitxml "$OUT/gpu-tests-generate.xml" \
    tests/test_gpu.py -k "generate or auto_backend or sliding or pool_peak"
  echo "tests (generate) exit $?"
fi
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" "$PYTHON" -m pytest -m gpu -v -ra -p no:cacheprovider --junitxml "$OUT/gpu-tests-rest.xml" \
    tests/test_gpu_fp8.py tests/test_gpu.py -k "not (generate or auto_backend or sliding or pool_peak)"
  echo "tests (rest) exit $?"
fi
echo "== done in $(($(date +%s) - START)) s"
