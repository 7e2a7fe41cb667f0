#!/usr/bin/env bash
# Issue #13 on the GPU: what was written without a GPU on 2026-12-03 (fifth session).
# - Two experimental switches, off by default: DETCOMPILE_PDL_PREFETCH_MB (weight prefetch into L2
#   before the PDL wait, kernels/_pdl.py) and DETCOMPILE_ATTN_PAGE_PRELOAD (a split's page ids loaded
#   once, kernels/attention_triton.py): their GPU tests, what Triton compiled the decode kernel to
#   (attention_asm: async copies, registers), the attention kernel with and without the preload
#   (decode_split_schedule), batch-1 decode under each switch (decode_variants, tokens checked equal).
# - PDL on the TMA matmul (default on): the kernel tests, and batch-32 decode with and without PDL.
# Logs under $OUT: tests.log, asm.log, split.log, variants.log + decode_variants.{json,md,png},
# b32/ (batch 32).
#
# Usage (repo root, GPU machine): bash benchmarks/decode_speed_check.sh [tests|bench|all]
#   tests: install, GPU tests, attention_asm, decode_split_schedule (~4 min); bench: decode_variants (~5 min).
#   Two calls back to back keep each under the device's 10-minute limit.
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
if [ "$PART" != bench ]; then
{
  timeout 120 python3 -m pytest -p no:cacheprovider -q -n 4 -m gpu tests/kernels/test_pdl.py tests/kernels/test_matmul.py \
    tests/kernels/test_linear_group.py
  echo "[kernels] exit $?"
  DETCOMPILE_ATTN_PAGE_PRELOAD=1 timeout 100 python3 -m pytest -p no:cacheprovider -q -n 4 -m gpu \
    tests/kernels/test_paged_attention.py tests/kernels/test_paged_attention_varlen.py tests/kernels/test_paged_attention_window_sinks.py
  echo "[attention, DETCOMPILE_ATTN_PAGE_PRELOAD=1] exit $?"
  DETCOMPILE_PDL_PREFETCH_MB=16 DETCOMPILE_ATTN_PAGE_PRELOAD=1 timeout 120 python3 -m pytest -p no:cacheprovider -q -m gpu \
    tests/engine/test_engine_gpu.py
  echo "[engine, both switches] exit $?"
} > "$OUT/tests.log" 2>&1
grep -E "passed|failed|exit" "$OUT/tests.log"
timeout 60 python3 -m benchmarks.attention_asm --out "$OUT" > "$OUT/asm.log" 2>&1; echo "attention_asm exit $?"; cat "$OUT/asm.log"
timeout 150 python3 -m benchmarks.decode_split_schedule --batches 1,8,32 --contexts 384,2048 --page-preload 0,1 \
  --out "$OUT" > "$OUT/split.log" 2>&1
echo "decode_split_schedule exit $?"; grep -vE "^copy|^split +batch" "$OUT/split.log" | head -12
fi
if [ "$PART" != tests ]; then
  timeout 330 python3 -m benchmarks.decode_variants --out "$OUT" > "$OUT/variants.log" 2>&1
  echo "decode_variants exit $?"; grep -E "tok/s|WARNING" "$OUT/variants.log"
  mkdir -p "$OUT/b32"
  timeout 200 python3 -m benchmarks.decode_variants --batch 32 --prompt-len 1024 --tokens 64 \
    --variants "pdl=;no pdl=DETCOMPILE_PDL=0;pdl again=" --out "$OUT/b32" > "$OUT/b32/variants.log" 2>&1
  echo "decode_variants batch 32 exit $?"; grep -E "tok/s|WARNING" "$OUT/b32/variants.log"
fi
