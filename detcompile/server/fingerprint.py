"""The reproducibility fingerprint: a hash of everything that decides a response's bits except the
request itself (and its seed, which every response reports beside the fingerprint).

Two servers with the same fingerprint give the same bits for the same request, so replicas with one
fingerprint are interchangeable behind a load balancer. It covers the weights (an exact integer
checksum of every parameter and buffer), the model config, the tokenizer, the detcompile source (the kernels, passes and engine
files), the versions of torch, transformers and triton, the device kind, the dtype, deterministic or
stock kernels, the engine settings and the ``DETCOMPILE_*`` kernel knobs of the environment.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

_CHUNK = 1 << 24  # elements per step of the weight checksum (bounded temporaries on the GPU)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64


def _to_int64(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as int64 values, one per element (sign-extended)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(_INT_VIEW[t.element_size()]).to(torch.int64)


@torch.no_grad()
def tensor_digest(t: torch.Tensor) -> str:
    """An exact checksum of a tensor's bits, computed where the tensor lives (no copy of the weights
    to the host): two position-weighted int64 sums with wrap-around, which do not depend on the
    order of the reduction, so every device and kernel gives the same answer."""
    flat = _to_int64(t)
    n = flat.numel()
    acc1 = torch.zeros((), dtype=torch.int64, device=flat.device)
    acc2 = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, n, _CHUNK):
        v = flat[start:start + _CHUNK]
        idx = torch.arange(start, start + v.numel(), dtype=torch.int64, device=v.device)
        z = idx * _M1 + 0x632BE59BD9B4E019
        z = (z ^ (z >> 31)) * _M2
        z = z ^ (z >> 29)
        acc1 += ((v + 0x2545F491) * z).sum()
        acc2 += ((v ^ z) * (z | 1)).sum()
    return f"{int(acc1) & (2**64 - 1):016x}{int(acc2) & (2**64 - 1):016x}"


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{tensor_digest(t)}\n".encode())
    return h.hexdigest()


_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
                 "architectures"}  # (the class that runs is hashed instead)


def config_digest(model) -> str:
    """sha256 of the model config (what the weights do not say: RoPE, norms, windows, ...)."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _CONFIG_NOISE}

    blob = json.dumps([type(model).__name__, clean(model.config.to_dict())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of the tokenizer (text prompts become these ids) and its chat template."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([getattr(tokenizer, "chat_template", None), str(getattr(tokenizer, "special_tokens_map", {}))])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def source_digest() -> str:
    """sha256 of detcompile's own Python files (kernels, passes, engine): what version numbers miss."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("server/"):
            continue  # the HTTP layer does not touch the bits
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:sm{p.major}{p.minor}"
    return f"{device.type}:{platform.machine()}"


def model_digests(model) -> dict:
    """The weights and config digests of ``model``. Under tensor parallelism they are taken from the
    whole model, before ``Engine(tensor_parallel_size=...)`` shards it in place, and passed to
    ``fingerprint``: a rank's shard would cover part of the weights and name its rank."""
    return {"weights_sha256": weights_digest(model), "config_sha256": config_digest(model)}


def fingerprint(engine, digests: dict | None = None) -> tuple[str, dict]:
    """(fingerprint, its components) of an engine. The served model name is not part of it:
    replicas may call the same weights by different names. ``digests``: ``model_digests`` of the
    unsharded model (required for a tensor-parallel engine, whose model is a shard)."""
    import detcompile

    tp = getattr(engine, "tensor_parallel_size", None)
    if tp is not None and digests is None:
        raise ValueError("fingerprint: a tensor-parallel engine holds a shard; pass model_digests(model) of the "
                         "whole model, taken before the engine was built")
    digests = digests or model_digests(engine.model)
    runner = engine.runner
    knobs = {k: v for k, v in sorted(os.environ.items())
             if k.startswith("DETCOMPILE_") and "KEY" not in k and "TOKEN" not in k}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        knobs["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    parts = {
        "weights_sha256": digests["weights_sha256"],
        "config_sha256": digests["config_sha256"],
        "tokenizer_sha256": tokenizer_digest(engine.tokenizer),
        "detcompile": detcompile.__version__,
        "detcompile_source_sha256": source_digest(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "device": device_kind(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""),
        "deterministic": bool(engine.deterministic),
        "engine": {
            "block_size": runner.block_size,
            "max_model_len": engine.max_model_len,
            "chunked_prefill_size": engine.scheduler.max_num_batched_tokens,
            "prefix_caching": engine.blocks.enable_prefix_caching,
            "cuda_graphs": bool(runner.graphs),
            # another backend is another reduction order: other bits
            "attention_backend": runner.backend.describe() if runner.backend is not None else "triton",
        },
        "kernel_env": knobs,
    }
    if tp is not None:
        # The TP-invariant reductions: other bits than no TP, the same bits at every TP size, so the
        # size is reported (get_model_info) but not hashed: servers at --tp 1, 2, 4 are replicas.
        parts["tensor_parallel"] = True
    blob = json.dumps(parts, sort_keys=True).encode()
    kind = "det" if engine.deterministic else "stock"
    return f"detc-{kind}-{hashlib.sha256(blob).hexdigest()[:16]}", parts
