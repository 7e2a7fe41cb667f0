#!/usr/bin/env bash
# The server on the GPU: `detcompile serve` with the Llama-3-8B-shaped random model, then
# `detcompile check-server` in every mode and a load run; logs under $OUT.
# Usage (repo root, GPU machine): [MODEL=tiny] [ATTN=fa3] [NEW=100] [LOAD_NEW=256] [MODES="single ..."] \
#   bash benchmarks/server_gpu_check.sh [TRIALS] [LOAD_REQUESTS]
# ATTN: the attention backend (triton, fa3, flashinfer); NEW: new tokens per check request;
# LOAD_NEW: most new tokens of a load request; LOAD=0 skips the load run.
# Wheels for fastapi/uvicorn/pydantic (absent on the GPU image) are installed from .whl/ if present.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRIALS=${1:-50}; LOAD=${2:-64}
export PYTHONUNBUFFERED=1
source benchmarks/gpu_wheels_env.sh  # fastapi/uvicorn/pydantic (and the attention backends) from .whl/
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
python3 -m detcompile serve --model "${MODEL:-llama3-8b-random}" --attention-backend "${ATTN:-triton}" --port 30000 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do grep -q "listening on" "$OUT/serve.log" && break; sleep 2; done
grep -q "listening on" "$OUT/serve.log" || { tail -30 "$OUT/serve.log"; kill $SERVER; exit 1; }
URL=http://127.0.0.1:30000
{
  for m in ${MODES:-single mixed prefix radix p_vs_d}; do
    t0=$SECONDS
    python3 -m detcompile check-server --url $URL --mode $m --n-trials "$TRIALS" --max-new-tokens "${NEW:-100}" \
      --quiet || echo "FAIL $m"
    echo "[time] $m $((SECONDS - t0)) s"
  done
  python3 -m detcompile check-server --url $URL --mode single --n-trials 10 --temperature 0.8 --quiet || echo "FAIL single T=0.8"
  if [ "$LOAD" -gt 0 ]; then
    python3 -m detcompile check-server --url $URL --mode load --n-requests "$LOAD" --concurrency "$LOAD" \
      --temperature 0.8 --max-new-tokens "${LOAD_NEW:-256}" || echo "FAIL load"
  fi
} 2>&1 | tee "$OUT/check_server.txt"
kill $SERVER; wait $SERVER 2>/dev/null
grep -E "ready|KV cache|captured" "$OUT/serve.log" | head -5
