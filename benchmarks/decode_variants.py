"""Decode speed under environment variants (issue #13: switches that may not change bits, GPU).

    python -m benchmarks.decode_variants [--variants "base=;no pdl=DETCOMPILE_PDL=0;..."]
                                         [--batch 1] [--prompt-len 128] [--tokens 256]
                                         [--model llama8b|tiny] [--out DIR]

A variant is ``name=`` followed by ``VAR=value`` settings joined by ``+`` (none: today's defaults).
For each, one engine is built on the same model (its kernels and CUDA graphs see the settings), the
batch's prompts are prefilled, and ``--tokens`` greedy decode steps are timed on the host clock (each
step ends with its tokens on the host). The switches may only change how kernels are launched or
move data, so every variant must give the first one's tokens (checked). Default variants: the
decode matmuls prefetching 2-8 MB of weights into L2 before their PDL wait
(``DETCOMPILE_PDL_PREFETCH_MB``, kernels/_pdl.py), gate/up and SwiGLU in one launch
(``DETCOMPILE_SWIGLU_ONE_LAUNCH=1``, kernels/linear_swiglu.py), PDL off (``DETCOMPILE_PDL=0``), and the base again
(noise). H200, 2026-12-03: a first prefetch that also let every kernel trigger the next launch
before its wait (179.5 -> 165.5 tok/s at batch 1) and a split's page ids loaded once (179.7) were
measured with it.
Writes ``decode_variants.json``, ``.md`` and ``.png`` under ``--out``.
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

DEFAULT_VARIANTS = ("base=;pf2=DETCOMPILE_PDL_PREFETCH_MB=2;pf4=DETCOMPILE_PDL_PREFETCH_MB=4;"
                    "pf8=DETCOMPILE_PDL_PREFETCH_MB=8;swiglu one launch=DETCOMPILE_SWIGLU_ONE_LAUNCH=1;"
                    "swiglu+pf4=DETCOMPILE_SWIGLU_ONE_LAUNCH=1+DETCOMPILE_PDL_PREFETCH_MB=4;"
                    "no pdl=DETCOMPILE_PDL=0;base again=")


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``"a=X=1+Y=2;b="`` -> [("a", {"X": "1", "Y": "2"}), ("b", {})]."""
    out = []
    for item in filter(None, (v.strip() for v in text.split(";"))):
        name, _, settings = item.partition("=")
        env = {}
        for kv in filter(None, settings.split("+")):
            key, sep, value = kv.partition("=")
            if not sep or not key:
                raise ValueError(f"variant {name!r}: {kv!r} is not VAR=value")
            env[key.strip()] = value.strip()
        out.append((name.strip(), env))
    if not out:
        raise ValueError("no variants")
    return out


def decode_rate(model, dev, batch: int, prompt_len: int, tokens: int) -> tuple[float, list[list[int]]]:
    with Engine(model, max_num_seqs=max(8, batch), chunked_prefill_size=max(2048, prompt_len),
                kv_cache_fraction=0.5, log=lambda m: None) as eng:
        gen = torch.Generator().manual_seed(0)
        rids = [eng.add_request(torch.randint(10, eng.vocab_size, (prompt_len,), generator=gen).tolist(),
                                SamplingParams(temperature=0.0, max_new_tokens=tokens + 8 * batch, ignore_eos=True))
                for _ in range(batch)]
        while any(len(eng.requests[r][0].output) < 4 for r in rids):  # prefills, a few decode steps: warm
            eng.step()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(tokens):
            eng.step()
        sync(dev)
        rate = batch * tokens / (time.perf_counter() - t0)
        return rate, [list(eng.requests[r][0].output) for r in rids]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--model", default="llama8b", choices=["llama8b", "tiny"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    variants = parse_variants(a.variants)
    os.makedirs(a.out, exist_ok=True)
    spec = model_spec(a.model)
    model, _ = build_model(spec)
    rows, first = [], None
    for name, env in variants:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            rate, toks = decode_rate(model, spec.device, a.batch, a.prompt_len, a.tokens)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        first = toks if first is None else first
        rows.append({"variant": name, "env": env, "tok_per_s": rate, "same_tokens_as_first": toks == first})
        print(f"{name:>14}: {rate:8.1f} tok/s, tokens {'same' if toks == first else 'DIFFER'}", flush=True)
    dev_name = torch.cuda.get_device_name() if spec.device.type == "cuda" else "cpu"
    res = {"device": dev_name, "model": a.model, "batch": a.batch, "prompt_len": a.prompt_len, "tokens": a.tokens,
           "rows": rows}
    base = os.path.join(a.out, "decode_variants")
    with open(base + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(f"# Decode variants ({a.model}, {dev_name}, batch {a.batch}, {a.prompt_len}-token prompts)\n\n"
                 "| variant | settings | output tok/s | same tokens |\n| --- | --- | --- | --- |\n")
        fh.writelines(f"| {r['variant']} | {' '.join(f'{k}={v}' for k, v in r['env'].items()) or '-'} | "
                      f"{r['tok_per_s']:.1f} | {r['same_tokens_as_first']} |\n" for r in rows)
        fh.write("\n![decode variants](decode_variants.png)\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([r["variant"] for r in rows], [r["tok_per_s"] for r in rows])
        ax.set_ylabel(f"decode tok/s (batch {a.batch})")
        ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=120)
        plt.close(fig)
    if not all(r["same_tokens_as_first"] for r in rows):
        print("WARNING: the variants gave different tokens")
    return res


if __name__ == "__main__":
    main()
