"""Shared helpers of the engine tests: tiny engines, random prompts, and output fingerprints."""
from __future__ import annotations

import struct

import torch

from detcompile.engine import Engine
from detcompile.models import tiny_model


def make_engine(arch: str = "llama", *, device: str = "cpu", dtype=torch.float32, tokenizer=None, **options) -> Engine:
    model = tiny_model(arch, dtype=dtype, device=device, **options.pop("config", {}))
    defaults = dict(max_num_seqs=16, chunked_prefill_size=32, block_size=4, max_model_len=128,
                    kv_cache_bytes=None if device == "cuda" else 8 << 20, log=lambda msg: None)
    defaults.update(options)
    return Engine(model, tokenizer=tokenizer, **defaults)


def prompts(gen: torch.Generator, lengths, vocab: int, low: int = 4) -> list[list[int]]:
    return [torch.randint(low, vocab, (n,), generator=gen).tolist() for n in lengths]


def bits(xs) -> tuple:
    """Exact float bits (a float32 logprob converted to a Python float is exact)."""
    return tuple(struct.pack("<d", x) for x in (xs or []))


def fingerprint(out) -> tuple:
    """Everything a request returns that must be bitwise reproducible, for all its samples."""
    return tuple((tuple(o.token_ids), bits(o.logprobs), o.finish_reason,
                  tuple(tuple((i, struct.pack("<d", lp)) for i, lp in top) for top in (o.top_logprobs or [])))
                 for o in out.outputs)


def distinct(fps) -> int:
    return len(set(fps))


def alone(engine, prompt, params) -> tuple:
    """The fingerprint of ``prompt`` generated alone, with an empty prefix cache."""
    engine.flush_cache()
    return fingerprint(engine.generate(prompt, params, use_tqdm=False)[0])
