"""Batch-1 decode with and without weight prefetch under PDL (issue #13; experimental, GPU).

    python -m benchmarks.decode_prefetch [--mb 0,4,16,32] [--model llama8b|tiny] [--tokens 256] [--out DIR]

For each budget (``DETCOMPILE_PDL_PREFETCH_MB``; 0 = today's default launches) one engine is built on
the same model, one 128-token prompt is prefilled, and ``--tokens`` greedy decode steps are timed on
the host clock (each step ends with its token on the host). With a budget, every PDL kernel lets the
next launch start before it waits, and the decode matmuls prefetch their weight rows into L2 before
they wait (kernels/_pdl.py): a weight read can then start while attention or a norm still runs.
Prefetching moves no data the kernels use, so every budget must give the same tokens (checked).
Writes ``decode_prefetch.json``, ``.md`` and ``.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.engine import build_model, model_spec, sync
from benchmarks.kernels.plots import pyplot
from detcompile.engine import Engine, SamplingParams
from detcompile.kernels import _pdl


def decode_rate(model, dev, mb: str, tokens: int) -> tuple[float, list[int]]:
    os.environ[_pdl.PREFETCH_ENV] = mb
    with Engine(model, max_num_seqs=8, chunked_prefill_size=2048, kv_cache_fraction=0.5, log=lambda m: None) as eng:
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(10, eng.vocab_size, (128,), generator=gen).tolist()
        rid = eng.add_request(prompt, SamplingParams(temperature=0.0, max_new_tokens=tokens + 8, ignore_eos=True))
        for _ in range(4):  # prefill and a few decode steps: graphs and caches warm
            eng.step()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(tokens):
            eng.step()
        sync(dev)
        rate = tokens / (time.perf_counter() - t0)
        return rate, list(eng.requests[rid][0].output)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="0,4,16,32", help="prefetch budgets in MB per launch (0: none)")
    ap.add_argument("--model", default="llama8b", choices=["llama8b", "tiny"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    spec = model_spec(a.model)
    model, _ = build_model(spec)
    saved = os.environ.get(_pdl.PREFETCH_ENV)
    rows, first = [], None
    try:
        for mb in a.mb.split(","):
            rate, toks = decode_rate(model, spec.device, mb.strip(), a.tokens)
            first = toks if first is None else first
            rows.append({"prefetch_mb": float(mb), "tok_per_s": rate, "same_tokens_as_first": toks == first})
            print(f"prefetch {mb:>5} MB: {rate:7.1f} tok/s, tokens {'same' if toks == first else 'DIFFER'}", flush=True)
    finally:
        if saved is None:
            os.environ.pop(_pdl.PREFETCH_ENV, None)
        else:
            os.environ[_pdl.PREFETCH_ENV] = saved
    dev_name = torch.cuda.get_device_name() if spec.device.type == "cuda" else "cpu"
    res = {"device": dev_name, "model": a.model, "tokens": a.tokens, "rows": rows}
    base = os.path.join(a.out, "decode_prefetch")
    with open(base + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(f"# Batch-1 decode with weight prefetch ({a.model}, {dev_name})\n\n"
                 "| prefetch MB per launch | tok/s | same tokens |\n| --- | --- | --- |\n")
        fh.writelines(f"| {r['prefetch_mb']:g} | {r['tok_per_s']:.1f} | {r['same_tokens_as_first']} |\n" for r in rows)
        fh.write("\n![decode prefetch](decode_prefetch.png)\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([f"{r['prefetch_mb']:g}" for r in rows], [r["tok_per_s"] for r in rows])
        ax.set_xlabel("prefetch MB per launch")
        ax.set_ylabel("batch-1 decode tok/s")
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=120)
        plt.close(fig)
    if not all(r["same_tokens_as_first"] for r in rows):
        print("WARNING: the budgets gave different tokens")
    return res


if __name__ == "__main__":
    main()
