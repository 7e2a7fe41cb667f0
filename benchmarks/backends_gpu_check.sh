#!/usr/bin/env bash
# Issue #14 on the GPU: the engine's determinism tests (tests/engine/test_backends_gpu.py) once per
# attention backend (for fa3/flashinfer also the compile backend's path to the library,
# tests/kernels/test_attention_dense_backends.py), then the reference table of docs/attention_backends.md,
# one row per backend.
# Logs under $OUT: env.txt, backends_tests.log (pytest -rA of every run), backends_<b>.xml, backends_table.md.
#
# Usage (repo root, GPU machine): [BACKENDS="triton fa3 flashinfer"] bash benchmarks/backends_gpu_check.sh
# Wheels in .whl/ are installed with --no-deps into /tmp/site: fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl
# (it imports nothing beyond torch) for fa3; for flashinfer, flashinfer_python-0.7.4-py3-none-any.whl (a repack
# small enough to travel, see docs/attention_backends.md) with apache_tvm_ffi (the wheel of the machine's
# Python); the image has the rest of what its import needs (nvidia-ml-py, requests, jinja2, ...) and ninja.
# Prebuilt kernel modules in .whl/aot/ go to flashinfer/data/aot/ (loaded before any JIT); a kernel without one
# is compiled with the CUDA toolkit's nvcc (CUDA_HOME, PATH or /usr/local/cuda), linked against an empty
# libcuda stub when the toolkit has none. A backend whose package does not import is skipped and the table
# says why.
# Time: about a minute and a half per backend (two engines each) plus FlashInfer's first compile (minutes);
# each run is cut at TIMEOUT_<backend> seconds (defaults below).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  if command -v nvcc >/dev/null; then nvcc --version | tail -1; else echo "nvcc: not found (FlashInfer's JIT needs it)"; fi
} 2>&1 | tee "$OUT/env.txt"
source benchmarks/gpu_wheels_env.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }

: > "$OUT/backends_tests.log"
for b in ${BACKENDS:-triton fa3 flashinfer}; do
  case $b in
    fa3) mod=fa3_fwd_interface; limit=${TIMEOUT_fa3:-120} ;;
    flashinfer) mod=flashinfer; limit=${TIMEOUT_flashinfer:-300} ;;  # its first JIT compile takes minutes
    *) mod=; limit=${TIMEOUT_triton:-120} ;;
  esac
  rm -f "$OUT/import_$b.txt" "$OUT/backends_$b.xml"
  if [ -n "$mod" ] && ! python3 -c "import $mod; print('$mod', getattr($mod, '__file__', ''))" > "$OUT/import_$b.txt" 2>&1; then
    echo "[$b] skipped: 'import $mod' failed: $(tail -1 "$OUT/import_$b.txt")" | tee -a "$OUT/backends_tests.log"
    continue
  fi
  [ -n "$mod" ] && : > "$OUT/import_$b.txt"  # imported: nothing to report
  t0=$SECONDS
  echo "===== $b =====" >> "$OUT/backends_tests.log"
  timeout "$limit" python3 -m pytest -p no:cacheprovider -q -rA tests/engine/test_backends_gpu.py -k "$b" \
    --junitxml="$OUT/backends_$b.xml" >> "$OUT/backends_tests.log" 2>&1
  rc=$?
  echo "[$b] pytest exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/backends_tests.log"
  if [ -n "$mod" ]; then  # the compile backend's path to the same library (options={"attention_backend": b})
    timeout "$limit" python3 -m pytest -p no:cacheprovider -q -rA -m gpu tests/kernels/test_attention_dense_backends.py \
      -k "$b" >> "$OUT/backends_tests.log" 2>&1
    echo "[$b] compile-backend attention: pytest exit $?" | tee -a "$OUT/backends_tests.log"
  fi
done
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/backends_tests.log" | cut -c1-200 | tail -40
python3 benchmarks/backends_table.py "$OUT" ${BACKENDS:-} | tee "$OUT/backends_table.md"
