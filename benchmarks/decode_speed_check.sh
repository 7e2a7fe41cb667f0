#!/usr/bin/env bash
# Issue #13 on the GPU, one call: the decode-path change that was only CPU-tested when written
# (weight prefetch into L2 before the PDL wait, DETCOMPILE_PDL_PREFETCH_MB; kernels/_pdl.py), then
# batch-1 decode at several prefetch budgets (benchmarks/decode_prefetch.py, tokens checked equal).
# (2026-12-03's version of this script verified the add + RMSNorm kernel and PDL; both are defaults now.)
# Logs under $OUT: tests.log, prefetch.log and decode_prefetch.{json,md,png}. About 6 minutes on the H200.
#
# Usage (repo root, GPU machine): bash benchmarks/decode_speed_check.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
{
  timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/kernels/test_pdl.py tests/kernels/test_matmul.py \
    tests/kernels/test_linear_group.py
  echo "[kernels] exit $?"
  DETCOMPILE_PDL_PREFETCH_MB=16 timeout 120 python3 -m pytest -p no:cacheprovider -q -m gpu tests/engine/test_engine_gpu.py
  echo "[engine, DETCOMPILE_PDL_PREFETCH_MB=16] exit $?"
} > "$OUT/tests.log" 2>&1
grep -E "passed|failed|exit" "$OUT/tests.log"
timeout 300 python3 -m benchmarks.decode_prefetch --mb 0,4,16,32,0 --out "$OUT" > "$OUT/prefetch.log" 2>&1
echo "decode_prefetch exit $?"; grep -E "prefetch|WARNING" "$OUT/prefetch.log"
