"""What Triton made of the paged decode kernel (GPU; issue #13): async copies, registers, spills.

    python -m benchmarks.attention_asm [--out DIR]

A decode program walks a 64-key tile in ~2 us (H200, 2026-12-03): latency, not bandwidth. This
launches the engine's decode call (Llama-3-8B heads, pages of 16, batch 1, 384 keys) in both
schedules, then reads each compiled variant from the kernel's cache: async copies (``cp.async``) and
plain global loads in the PTX, the pipeliner's async copies in the TTGIR, registers and spills.
Writes ``attention_asm.json``. ncu is not on the GPU image; this is the next best look inside.

H200, 2026-12-03 (triton 3.6): the K/V loads are pipelined (64 ``cp.async`` in the PTX, 8 async
copies in the TTGIR), so the page-table read inside the loop was not the problem (loading a split's
page ids once instead changed nothing: 179.7 vs 179.5 tok/s, removed). Both variants use 255
registers and spill (38 and 18 spills, loop and split schedule).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HQ, HKV, D, PAGE, KEYS = 32, 8, 128, 16, 384


def compiled_kernels(jit_fn) -> list:
    """Every compiled variant in a JITFunction's cache (Triton 3.6 and 3.9 keep them per device)."""
    out = []
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        out.extend(cache.values())
    return out


def describe(k) -> dict:
    ptx, ttgir = k.asm.get("ptx", ""), k.asm.get("ttgir", "")
    src = getattr(k, "src", None)
    names = list(getattr(getattr(src, "fn", None), "arg_names", []))
    named = {}
    for key, v in dict(getattr(src, "constants", None) or {}).items():  # keyed by (arg index,) or name
        idx = key[0] if isinstance(key, tuple) and key else key
        named[names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)] = v
    keys = ("PARALLEL_SPLITS", "PDL", "VARLEN", "BLOCK_M", "BLOCK_N")
    return {
        "constexprs": {n: named[n] for n in keys if n in named},
        "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        "cp_async_bulk": ptx.count("cp.async.bulk"),
        "ld_global": ptx.count("ld.global"),
        "ttgir_async_copies": ttgir.count("async_copy_global_to_local"),
        "n_regs": getattr(k, "n_regs", None),
        "n_spills": getattr(k, "n_spills", None),
        "shared_bytes": getattr(getattr(k, "metadata", None), "shared", None),
    }


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.attention_asm needs a CUDA GPU")
    from detcompile.kernels import attention_triton as AT
    from detcompile.kernels import paged_attention as P

    dev, dt = torch.device("cuda"), torch.bfloat16
    pages = -(-KEYS // PAGE)
    kc, vc = (torch.randn(pages + 64, PAGE, HKV, D, device=dev, dtype=dt) for _ in range(2))
    bt = torch.arange(pages + 64, device=dev, dtype=torch.int32)[None]  # a graph-wide table: 1024+ keys
    kl = torch.full((1,), KEYS, device=dev, dtype=torch.int32)
    q = torch.randn(1, HQ, 1, D, device=dev, dtype=dt)
    for par in (False, True):
        P.triton_paged_attention(q, kc, vc, bt, kl, _parallel_splits=par)
    torch.cuda.synchronize()
    rows = [describe(k) for k in compiled_kernels(AT._attention_kernel)]
    for r in rows:
        print(json.dumps(r), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "attention_asm.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
