#!/usr/bin/env bash
# Issue #13 on the GPU after the 2026-12-03 (sixth session) changes: matmul at M = 17..64 on the
# pointer kernel, the prefetch / page-preload switches removed. Two calls back to back keep each
# under the device's 10-minute limit.
#   tests: the GPU tests of the kernels and the engine, the decode attention tile at 8 warps (bits
#          checked against the 64x4 tile; the compiled kernel spills at 4 warps)  (~5 min)
#   bench: matmul vs cuBLAS, the engine benchmark (~4 min)
# Logs under $OUT: tests.log, split.log + decode_split_schedule.json, k* (matmul), e/ (engine).
#
# Usage (repo root, GPU machine): bash benchmarks/decode_speed_check.sh [tests|bench|all]
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
if [ "$PART" != bench ]; then
{
  timeout 240 python3 -m pytest -p no:cacheprovider -q -n 4 -m "gpu and not slow" tests/kernels/test_pdl.py \
    tests/kernels/test_matmul.py tests/kernels/test_linear_group.py tests/kernels/test_paged_attention.py \
    tests/kernels/test_paged_attention_varlen.py tests/kernels/test_paged_attention_window_sinks.py \
    tests/kernels/test_attention.py tests/engine/test_engine_release.py
  echo "[kernels] exit $?"
  timeout 120 python3 -m pytest -p no:cacheprovider -q -m gpu tests/engine/test_engine_gpu.py
  echo "[engine] exit $?"
} > "$OUT/tests.log" 2>&1
grep -E "passed|failed|exit" "$OUT/tests.log"
timeout 150 python3 -m benchmarks.decode_split_schedule --batches 1,8,32 --contexts 384,2048 --tiles 64x4,64x8 \
  --out "$OUT" > "$OUT/split.log" 2>&1
echo "decode_split_schedule exit $?"; grep -vE "^copy|^split +batch" "$OUT/split.log" | head -12
fi
if [ "$PART" != tests ]; then
  timeout 120 python3 -m benchmarks.kernels --only matmul --out "$OUT/k" > "$OUT/k.log" 2>&1
  echo "kernels matmul exit $?"; grep -E "Geomean|PASS|FAIL" "$OUT/k.log"
  mkdir -p "$OUT/e"
  timeout 300 python3 -m benchmarks.engine --model llama8b --out "$OUT/e" > "$OUT/e/log" 2>&1
  echo "engine exit $?"; grep -E "^\| (deterministic|stock|32|256) |det / roofline" "$OUT/e/engine_bench.md"
fi
