"""``detcompile.generate(model, ...)`` and ``detcompile.patch_generate(model)``: Hugging Face style
generation through the engine, so each row gives exactly what its prompt gives alone.

HF's own ``generate`` over a left-padded batch is not batch-invariant (the padding changes the
shapes every kernel sees) and draws from the global random generator; the engine is neither."""
from __future__ import annotations

import types

import torch

from .engine import Engine, RequestOutput
from .sampling_params import SamplingParams

_ENGINE_ATTR = "_detcompile_engine"


def engine_for(model, **engine_options) -> Engine:
    """The engine serving ``model``, built on first use and kept on the model (rebuilt when other
    engine options are asked for, or once it is closed)."""
    cached = getattr(model, _ENGINE_ATTR, None)
    if cached is not None and cached[0] == engine_options and not cached[1].closed:
        return cached[1]
    if cached is not None:  # freed first: the new engine sizes its KV cache by the free memory
        cached[1].close()
    engine = Engine(model, **engine_options)
    object.__setattr__(model, _ENGINE_ATTR, (dict(engine_options), engine))
    return engine


def generate(model, prompts, *, tokenizer=None, seed: int | None = None, max_new_tokens: int = 16,
             temperature: float = 1.0, engine_options: dict | None = None, use_tqdm: bool = True,
             **sampling) -> list[RequestOutput]:
    """One call: ``detcompile.generate(model, prompts, seed=7, max_new_tokens=24, temperature=0.8)``.

    ``prompts``: a string, a list of token ids, or a list of either. Other keywords are
    ``SamplingParams`` fields (top_p, top_k, logprobs, n, ...)."""
    options = dict(engine_options or {})
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    engine = engine_for(model, **options)
    params = SamplingParams(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
    return engine.generate(prompts, params, use_tqdm=use_tqdm)


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None) -> list[list[int]]:
    """The prompt of each row of a (left- or right-) padded batch."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        if pad_token_id is None:
            return input_ids.tolist()
        attention_mask = input_ids != pad_token_id
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]


def _params_from_hf(model, kwargs: dict) -> tuple[SamplingParams, dict]:
    gc = kwargs.pop("generation_config", None) or getattr(model, "generation_config", None)

    def pick(name, default=None):
        if name in kwargs:
            return kwargs.pop(name)
        return getattr(gc, name, default) if gc is not None else default

    do_sample = bool(pick("do_sample", False))
    max_new = pick("max_new_tokens", None)
    max_length = kwargs.pop("max_length", None)
    params = dict(
        n=int(pick("num_return_sequences", 1) or 1),
        temperature=float(pick("temperature", 1.0) or 1.0) if do_sample else 0.0,
        top_p=float(pick("top_p", 1.0) or 1.0) if do_sample else 1.0,
        top_k=int(pick("top_k", 0) or 0) if do_sample else -1,
        min_p=float(pick("min_p", 0.0) or 0.0) if do_sample else 0.0,
        repetition_penalty=float(pick("repetition_penalty", 1.0) or 1.0),
        min_new_tokens=int(pick("min_new_tokens", 0) or 0),
        seed=kwargs.pop("seed", None),
    )
    if params["top_k"] == 0:
        params["top_k"] = -1
    eos = pick("eos_token_id", None)
    extra = {"max_new_tokens": max_new, "max_length": max_length, "eos": eos,
             "pad_token_id": pick("pad_token_id", None)}
    for flag in ("return_dict_in_generate", "output_scores", "output_logits"):
        extra[flag] = bool(pick(flag, False))
    for ignored in ("use_cache", "num_beams", "output_attentions", "output_hidden_states"):
        value = kwargs.pop(ignored, None)
        if ignored == "num_beams" and value not in (None, 1):
            raise ValueError("detcompile generate: beam search is not supported (num_beams must be 1)")
    if kwargs:
        raise TypeError(f"detcompile generate: unsupported argument(s) {sorted(kwargs)}")
    return SamplingParams(**params), extra


def hf_generate(model, input_ids=None, attention_mask=None, **kwargs):
    """``model.generate`` through the engine, returning what HF returns: the sequences tensor
    [B * n, prompt + new] (prompt kept as given, finished rows padded with ``pad_token_id``), or a
    ``GenerateDecoderOnlyOutput`` when ``return_dict_in_generate=True``, with per-step ``scores``
    (the processed logits the sampler chose from: penalties, temperature, -inf outside top-k /
    top-p / min-p) and ``logits`` (raw) when asked; rows of samples that finished hold -inf."""
    engine_options = getattr(model, "_detcompile_engine_options", {})
    engine = engine_for(model, **engine_options)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        raise ValueError("detcompile generate: input_ids are required")
    params, extra = _params_from_hf(model, kwargs)
    keep = extra["output_scores"] or extra["output_logits"]
    pad = extra["pad_token_id"]
    if pad is None:
        pad = next(iter(sorted(engine.eos_token_ids)), 0)
    prompts = _rows(input_ids, attention_mask, None if attention_mask is not None else pad)
    width = input_ids.shape[-1]
    max_new = extra["max_new_tokens"]
    if max_new is None:
        max_new = (extra["max_length"] or 20) - width
    params.max_new_tokens = int(max_new)
    if extra["eos"] is not None:
        eos = [extra["eos"]] if isinstance(extra["eos"], int) else list(extra["eos"])
        params.stop_token_ids = eos
    outs = engine.generate(prompts, params, use_tqdm=False, keep_logits=keep)
    rows = []
    for prompt_row, out in zip(input_ids.reshape(-1, width), outs):
        for sample in out.outputs:
            new = sample.token_ids + [pad] * (params.max_new_tokens - len(sample.token_ids))
            rows.append(torch.cat([prompt_row.cpu(), torch.tensor(new, dtype=prompt_row.dtype)]))
    longest = max(len(o.token_ids) for out in outs for o in out.outputs)
    sequences = torch.stack(rows)[:, : width + longest].to(input_ids.device)
    if extra["return_dict_in_generate"]:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        samples = [o for out in outs for o in out.outputs]
        per_step = {}
        if extra["output_scores"]:
            per_step["scores"] = _stack_steps([o.scores for o in samples], longest, engine.vocab_size)
        if extra["output_logits"]:
            per_step["logits"] = _stack_steps([o.logits for o in samples], longest, engine.vocab_size)
        per_step = {k: tuple(t.to(input_ids.device) for t in v) for k, v in per_step.items()}
        return GenerateDecoderOnlyOutput(sequences=sequences, **per_step)
    return sequences


def _stack_steps(rows_per_sample: list[list[torch.Tensor]], steps: int, vocab: int) -> tuple:
    """HF's layout: one [B * n, V] tensor per step; a sample that finished earlier holds -inf."""
    out = []
    for t in range(steps):
        out.append(torch.stack([rows[t] if t < len(rows) else torch.full((vocab,), float("-inf"))
                                for rows in rows_per_sample]))
    return tuple(out)


def patch_generate(model, **engine_options):
    """Opt in: afterwards ``model.generate(input_ids, attention_mask=..., do_sample=True,
    temperature=0.8, max_new_tokens=64, seed=7)`` runs through the engine. Returns the model."""
    object.__setattr__(model, "_detcompile_engine_options", dict(engine_options))
    model.generate = types.MethodType(hf_generate, model)
    return model
