"""Where a decode attention call's time goes (GPU; issue #13): a fixed cost plus a cost per key tile.

    python -m benchmarks.decode_attention_latency [--contexts 64,128,...,4096] [--out DIR]

At batch 1 a program walks its 64-key tiles one after another, and on the H200 (2026-12-03) each
tile took ~2 us, which is latency: 4 warps hold 4 real query rows (a GQA group) and load 32 KB of
K and V per tile. This times one decode query (Llama-3-8B heads: 32 q / 8 kv, head dim 128, bf16)
over contexts of 1..64 tiles, all keys in one program (the loop schedule), in variants that each
remove one suspect:

- ``paged16``: the engine's call (pages of 16: four page-table reads per tile);
- ``paged128``: pages of 128 (one page per tile: the page-table reads stay in L1);
- ``contiguous``: ``triton_attention`` on a contiguous K/V (no page table at all);
- ``paged16 x1 stage`` / ``x3 stages``: the engine's call with the K/V pipeline one deeper or none;
- ``sdpa``: torch's SDPA (flash) on the contiguous K/V, the target (#13: within 1.2x at batch 1).

Each variant's bits are compared with ``paged16`` (the same keys in the same order must give the
same bits; SDPA is not ours and is not compared). A least-squares line per variant gives its fixed
cost and its cost per 64-key tile. Writes ``decode_attention_latency.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HQ, HKV, D, TILE = 32, 8, 128, 64


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def _paged(k: torch.Tensor, v: torch.Tensor, page: int):
    """[1, Hkv, n, D] K/V as a paged cache of ``page``-token pages in a shuffled order, and its table."""
    n = k.shape[2]
    pages = -(-n // page)
    order = torch.randperm(pages, device=k.device)
    kc, vc = (torch.zeros(pages, page, HKV, D, device=k.device, dtype=k.dtype) for _ in range(2))
    for src, dst in ((k, kc), (v, vc)):
        flat = torch.zeros(pages * page, HKV, D, device=k.device, dtype=k.dtype)
        flat[:n] = src[0].transpose(0, 1)
        dst[order] = flat.view(pages, page, HKV, D)
    return kc, vc, order.to(torch.int32)[None]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="64,128,256,384,512,1024,2048,4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.decode_attention_latency needs a CUDA GPU")
    from triton.testing import do_bench_cudagraph

    from benchmarks.kernels.plots import pyplot
    from detcompile.kernels import attention_triton as AT
    from detcompile.kernels import paged_attention as P

    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    base = AT.tile_config(D, dt, rows=HQ // HKV)
    contexts = [int(c) for c in a.contexts.split(",")]
    names = ["paged16", "paged128", "contiguous", "paged16 x1 stage", "paged16 x3 stages", "sdpa"]
    us = {name: [] for name in names}
    same = {name: [] for name in names[1:-1]}
    for n in contexts:
        q = torch.randn(1, HQ, 1, D, device=dev, dtype=dt, generator=gen)
        k, v = (torch.randn(1, HKV, n, D, device=dev, dtype=dt, generator=gen) for _ in range(2))
        lens = torch.full((1,), n, device=dev, dtype=torch.int32)
        caches = {page: _paged(k, v, page) for page in (16, 128)}

        def paged(page):
            kc, vc, bt = caches[page]
            return lambda: P.triton_paged_attention(q, kc, vc, bt, lens, _parallel_splits=False)

        calls = {
            "paged16": paged(16), "paged128": paged(128),
            "contiguous": lambda: AT.triton_attention(q, k, v, None, False, enable_gqa=True, _parallel_splits=False),
            "paged16 x1 stage": paged(16), "paged16 x3 stages": paged(16),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        depth = {"paged16 x1 stage": 1, "paged16 x3 stages": 3}
        ref = None
        for name in names:
            AT._TILE_OVERRIDE = (base[0], base[1], base[2], depth[name]) if name in depth else None
            try:
                out = calls[name]()
                us[name].append(do_bench_cudagraph(calls[name], rep=20) * 1e3)
            finally:
                AT._TILE_OVERRIDE = None
            if name == "paged16":
                ref = out.reshape(-1).view(torch.int16)
            elif name in same:
                same[name].append(torch.equal(out.reshape(-1).view(torch.int16), ref))
        print(f"{n:5d} keys: " + ", ".join(f"{name} {us[name][-1]:6.1f} us" for name in names), flush=True)
    tiles = [-(-n // TILE) for n in contexts]
    fits = {name: dict(zip(("fixed_us", "per_tile_us"), fit_line(tiles, us[name]))) for name in names}
    res = {"device": torch.cuda.get_device_name(), "contexts": contexts, "tiles": tiles, "us": us, "fits": fits,
           "same_bits_as_paged16": {k: all(v) for k, v in same.items()}}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_attention_latency.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    lines = ["| variant | " + " | ".join(f"{n} keys" for n in contexts) + " | fixed us | us per tile | bits |",
             "| --- | " + " | ".join("---" for _ in contexts) + " | --- | --- | --- |"]
    for name in names:
        bits = "-" if name not in same else ("same" if res["same_bits_as_paged16"][name] else "OTHER")
        lines.append(f"| {name} | " + " | ".join(f"{t:.1f}" for t in us[name])
                     + f" | {fits[name]['fixed_us']:.1f} | {fits[name]['per_tile_us']:.2f} | {bits} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "decode_attention_latency.md"), "w") as fh:
        fh.write(f"# Decode attention latency, batch 1 ({res['device']})\n\n{table}\n\n"
                 "![latency](decode_attention_latency.png)\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            ax.plot(contexts, us[name], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys (one decode query, 32 q / 8 kv heads, head dim 128, bf16)")
        ax.set_ylabel("us per call")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "decode_attention_latency.png"), dpi=120)
        plt.close(fig)
    return res


if __name__ == "__main__":
    main()
