#!/usr/bin/env bash
# One device-tool call: environment facts, install, then the GPU test groups; logs under $OUT.
# Usage (from the repo root on the GPU machine): bash benchmarks/gpu_check.sh [pytest selection...]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
shift 0
python3 -m pytest -q -p no:cacheprovider -rfE "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -60
