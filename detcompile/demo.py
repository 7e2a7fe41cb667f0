"""``detcompile demo``: one prompt alone and inside batches of several sizes, through eager PyTorch,
stock ``torch.compile`` and ``backend="deterministic"``; how many distinct outputs each gives. Then
seeded sampling, the case users feel: HF ``generate(do_sample=True)`` after ``torch.manual_seed``
against detcompile's engine with a seed, the prompt again alone and in each batch.

The model is the embedded default (``detcompile.models.demo_model``): a small Llama-shaped model built
from a built-in config with seeded random weights, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import time
import warnings

import torch

from .models import demo_model


def _greedy(forward, ids: torch.Tensor, new_tokens: int):
    """Greedy decoding with a KV cache; returns (tokens [B, new], logits of every step [B, new, V])."""
    out = forward(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1].float()]
    toks = [logits[-1].argmax(-1)]
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = forward(input_ids=toks[-1][:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[:, -1].float())
        toks.append(logits[-1].argmax(-1))
    return torch.stack(toks, 1), torch.stack(logits, 1)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def run_demo(
    device: str = "auto",
    dtype: str = "float32",
    batch_sizes=(1, 2, 3, 4, 8, 16),
    prompt_len: int = 24,
    new_tokens: int = 8,
    ways=("eager", "torch.compile", "deterministic"),
    seed: int = 0,
    progress: bool = True,
    sampling: bool = True,
) -> dict:
    """Run the demo and return {way: {"logits": n_distinct, "tokens": n_distinct, "seconds": s}}, and
    with ``sampling`` the distinct seeded samples of HF generate and of the engine."""
    from tqdm.auto import tqdm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("detcompile demo: --device cuda asked for, but no CUDA GPU is available")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"detcompile demo: unknown dtype {dtype!r} (float32, bfloat16, float16)")
    bad = [w for w in ways if w not in ("eager", "torch.compile", "deterministic")]
    if bad:
        raise ValueError(f"detcompile demo: unknown way(s) {bad}")
    model = demo_model(dtype=torch_dtype, device=device, seed=seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    neighbours = torch.randint(0, vocab, (max(batch_sizes), prompt_len), generator=g)

    results = {}
    bar = tqdm(total=len(ways) * len(batch_sizes), desc="demo", disable=not progress)
    for way in ways:
        torch._dynamo.reset()
        if way == "eager":
            forward = model
        elif way == "torch.compile":
            forward = torch.compile(model)
        else:
            forward = torch.compile(model, backend="deterministic")
        logit_digests, token_digests = set(), set()
        t0 = time.perf_counter()
        for bs in batch_sizes:
            bar.set_postfix_str(f"{way} batch={bs}")
            # The prompt sits in the middle of the batch, between different neighbours.
            row = bs // 2
            batch = torch.cat([neighbours[:row], prompt, neighbours[row : bs - 1]]).to(device)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                toks, logits = _greedy(forward, batch, new_tokens)
            logit_digests.add(_digest(logits[row]))
            token_digests.add(_digest(toks[row]))
            bar.update(1)
        results[way] = {
            "logits": len(logit_digests),
            "tokens": len(token_digests),
            "seconds": time.perf_counter() - t0,
        }
    bar.close()
    res = {"device": device, "dtype": dtype, "batch_sizes": list(batch_sizes), "results": results}
    if sampling:
        res["sampling"] = _sampling(model, prompt, neighbours, batch_sizes, new_tokens, seed, device, progress)
    return res


def _batch(prompt, neighbours, bs):
    row = bs // 2
    return torch.cat([neighbours[:row], prompt, neighbours[row: bs - 1]]), row


def _sampling(model, prompt, neighbours, batch_sizes, new_tokens, seed, device, progress) -> dict:
    """Distinct samples of the prompt (temperature 0.8, one seed) over the batch sizes: HF draws from
    the global generator, so the prompt's draw depends on the rows before it; the engine's noise is a
    hash of (seed, position, token), the prompt's alone."""
    from tqdm.auto import tqdm

    from .engine import Engine, SamplingParams

    hf, engine_samples = set(), set()
    bar = tqdm(total=2 * len(batch_sizes), desc="sampling", disable=not progress)
    for bs in batch_sizes:
        batch, row = _batch(prompt, neighbours, bs)
        torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(batch.to(device), attention_mask=torch.ones_like(batch, device=device),
                                 do_sample=True, temperature=0.8, top_k=0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)
        hf.add(tuple(out[row, batch.shape[1]:].tolist()))
        bar.update(1)
    engine = Engine(model, max_num_seqs=max(batch_sizes), max_model_len=prompt.shape[1] + new_tokens + 8,
                    kv_cache_bytes=256 << 20, cuda_graphs=False, log=lambda m: None)
    params = SamplingParams(temperature=0.8, seed=seed, max_new_tokens=new_tokens, ignore_eos=True)
    for bs in batch_sizes:
        batch, row = _batch(prompt, neighbours, bs)
        outs = engine.generate([r.tolist() for r in batch], params, use_tqdm=False)
        engine_samples.add(tuple(outs[row].token_ids))
        bar.update(1)
    bar.close()
    return {"hf_generate": len(hf), "engine": len(engine_samples)}


def format_demo(res: dict) -> str:
    lines = [
        f"One prompt alone and inside batches of sizes {res['batch_sizes']} ({res['device']}, {res['dtype']}),",
        "greedy decoding with a KV cache. Distinct outputs for the prompt (1 = batch-invariant):",
        "",
        f"  {'way':<16}{'distinct logits':>17}{'distinct tokens':>17}{'seconds':>10}",
    ]
    for way, r in res["results"].items():
        lines.append(f"  {way:<16}{r['logits']:>17}{r['tokens']:>17}{r['seconds']:>10.1f}")
    if "sampling" in res:
        smp = res["sampling"]
        lines += [
            "",
            "Seeded sampling of the same prompt (temperature 0.8, one seed), alone and in each batch:",
            f"  HF generate(do_sample=True) after torch.manual_seed: {smp['hf_generate']} distinct samples",
            f"  detcompile Engine, SamplingParams(seed=...):        {smp['engine']} distinct sample(s)",
        ]
    return "\n".join(lines)
