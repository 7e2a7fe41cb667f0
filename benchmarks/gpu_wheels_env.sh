# Sourced by the GPU scripts (repo root): installs the wheels carried in .whl/ (the device image lacks
# fa3-fwd, flashinfer-python, fastapi/uvicorn/pydantic) into /tmp/site with --no-deps and sets up
# FlashInfer (prebuilt kernels, cache dir, arch, a libcuda stub for its JIT link step).
# Needs OUT set; writes $OUT/wheels.txt only when the install fails.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > /tmp/wheels.txt 2>&1 || { cp /tmp/wheels.txt "$OUT/wheels.txt"; cat /tmp/wheels.txt; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # bin: a ninja wheel's binary, if one was carried
  if [ -d .whl/aot ] && [ -d /tmp/site/flashinfer ]; then
    mkdir -p /tmp/site/flashinfer/data/aot && cp -r .whl/aot/* /tmp/site/flashinfer/data/aot/
  fi
fi
# FlashInfer: its cache under /tmp (the import creates it), the arch named (else the import starts CUDA to
# ask), and a libcuda stub for its JIT's link step where the toolkit has none.
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi} FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
if [ ! -e "$cuda_home/lib64/stubs/libcuda.so" ] && command -v gcc >/dev/null; then
  mkdir -p /tmp/cuda_stub && echo | gcc -shared -x c - -Wl,-soname,libcuda.so.1 -o /tmp/cuda_stub/libcuda.so \
    && export FLASHINFER_EXTRA_LDFLAGS="-L/tmp/cuda_stub"
fi
