#!/usr/bin/env bash
# Issue #13 on the GPU, one call: the decode-path changes that were only CPU-tested when written
# (the residual add + RMSNorm kernel; programmatic dependent launch behind DETCOMPILE_PDL=1), then
# batch-1 decode with and without PDL and a profile of each.
# Logs under $OUT: tests.log, decode1_pdl{0,1}.log (+ the benchmark's files in $OUT/pdl{0,1}/),
# profile_pdl{0,1}.log. About 6 minutes on the H200.
#
# Usage (repo root, GPU machine): bash benchmarks/decode_speed_check.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
{
  timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/kernels/test_pdl.py \
    tests/kernels/test_rms_norm_weight_after_cast.py tests/kernels/test_kv_cache_write.py
  echo "[kernels] exit $?"
  for pdl in 0 1; do
    DETCOMPILE_PDL=$pdl timeout 120 python3 -m pytest -p no:cacheprovider -q -m gpu tests/engine/test_engine_gpu.py
    echo "[engine, DETCOMPILE_PDL=$pdl] exit $?"
  done
} > "$OUT/tests.log" 2>&1
grep -E "passed|failed|exit" "$OUT/tests.log"
for pdl in 0 1; do
  mkdir -p "$OUT/pdl$pdl"
  DETCOMPILE_PDL=$pdl timeout 150 python3 -m benchmarks.engine --model llama8b --parts decode1 --out "$OUT/pdl$pdl" \
    > "$OUT/decode1_pdl$pdl.log" 2>&1
  echo "DETCOMPILE_PDL=$pdl: $(grep -m1 'det_cold: batch-1' "$OUT/decode1_pdl$pdl.log")"
  DETCOMPILE_PDL=$pdl timeout 100 python3 -m benchmarks.engine_profile --batches 1 --modes det --out "$OUT/pdl$pdl" \
    > "$OUT/profile_pdl$pdl.log" 2>&1
  grep "batch 1" "$OUT/profile_pdl$pdl.log"
done
