"""Attention tile-config study (GPU): prefill TFLOP/s and paged-decode bandwidth per fixed config.

    python -m benchmarks.attention_configs [--out DIR]

The attention kernel runs ONE tile config for prefill and decode alike (its layout sets the order
of the row sums), so a config must be good at both. For each candidate this times causal prefill
(Llama-3-8B heads: 32 q / 8 kv, head dim 128, bf16) and decode from a paged cache, and checks that
the decoded token equals the last row of the prefill bit for bit. It is the evidence behind
``attention_triton.tile_config``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3),
              (128, 128, 8, 2), (64, 128, 4, 2), (64, 128, 8, 2)]
PREFILL = [(1, 1024), (4, 1024), (1, 4096), (1, 8192)]
DECODE = [(32, 1024), (64, 1024), (32, 4096), (128, 16384)]
HQ, HKV, D, PAGE = 32, 8, 128, 16


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.attention_configs needs a CUDA GPU")
    from triton.testing import do_bench_cudagraph
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from detcompile.kernels import attention_triton as AT
    from detcompile.kernels import paged_attention as P

    dev, dt = torch.device("cuda"), torch.bfloat16
    res = {"flash": {}}
    pre_inputs = {}
    for B, L in PREFILL:
        q = torch.randn(B, HQ, L, D, device=dev, dtype=dt)
        k, v = (torch.randn(B, HKV, L, D, device=dev, dtype=dt) for _ in range(2))
        pre_inputs[(B, L)] = (q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep=20)
        res["flash"][f"B{B}/L{L}"] = 2 * B * HQ * L * L * D / t / 1e9
    dec_inputs = {}
    for B, n in DECODE:
        pages = B * (n // PAGE)
        kc, vc = (torch.randn(pages, PAGE, HKV, D, device=dev, dtype=dt) for _ in range(2))
        bt = torch.randperm(pages, device=dev, dtype=torch.int32).reshape(B, n // PAGE)
        kl = torch.full((B,), n, device=dev, dtype=torch.int32)
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
        dec_inputs[(B, n)] = (q, kc, vc, bt, kl)
    from benchmarks.kernels.bandwidth import measure_copy_bandwidth
    from benchmarks.kernels.timing import GraphTimer

    bw = measure_copy_bandwidth(GraphTimer(), dev, 1 << 30)["gbps"]  # this GPU's ceiling, measured now
    for cfg in CANDIDATES:
        AT._TILE_OVERRIDE = cfg
        row = {}
        try:
            for (B, L), (q, k, v) in pre_inputs.items():
                f = lambda: AT.triton_attention(q, k, v, None, True, enable_gqa=True)
                f()
                t = do_bench_cudagraph(f, rep=20)
                row[f"pre B{B}/L{L}"] = 2 * B * HQ * L * L * D / t / 1e9 / res["flash"][f"B{B}/L{L}"]
            for (B, n), (q, kc, vc, bt, kl) in dec_inputs.items():
                f = lambda: P.triton_paged_attention(q, kc, vc, bt, kl)
                f()
                t = do_bench_cudagraph(f, rep=20)
                floor = B * n * HKV * D * 2 * 2 / bw / 1e3  # ms
                row[f"dec B{B}/KV{n}"] = floor / t
            # Self-consistency: decoded token == last prefill row (one sequence, 3000 keys).
            q, k, v = (torch.randn(1, h, 3000, D, device=dev, dtype=dt) for h in (HQ, HKV, HKV))
            full = AT.triton_attention(q, k, v, None, True, enable_gqa=True)
            kc = k[0].transpose(0, 1).reshape(3000 // 8, 8, HKV, D).contiguous()
            vc = v[0].transpose(0, 1).reshape(3000 // 8, 8, HKV, D).contiguous()
            bt = torch.arange(3000 // 8, device=dev, dtype=torch.int32)[None]
            one = P.triton_paged_attention(q[:, :, -1:], kc, vc, bt, torch.tensor([3000], device=dev, dtype=torch.int32))
            row["decode==prefill"] = bool(torch.equal(one, full[:, :, -1:]))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res[str(cfg)] = row
        print(cfg, " ".join(f"{k}:{v:.2f}" if isinstance(v, float) else f"{k}:{v}" for k, v in row.items()), flush=True)
    AT._TILE_OVERRIDE = None
    print("flash TFLOP/s", {k: round(v) for k, v in res["flash"].items()})
    with open(os.path.join(args.out, "attention_configs.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
