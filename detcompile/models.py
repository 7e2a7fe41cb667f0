"""Tiny random-weight Hugging Face models, built from configs (no download): for tests, the demo and
``detcompile explain --arch``.
"""
from __future__ import annotations

import torch

#: Sizes shared by every tiny config; each architecture's own names for them are set too.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)

#: Per-architecture extras so that each exercises its distinctive features at tiny size.
EXTRA = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512),
    "gpt_neox": dict(rotary_pct=0.5),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma2": dict(
        sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16
    ),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(),
    "qwen3": dict(),
    "phi3": dict(pad_token_id=0),
    "bert": dict(type_vocab_size=2),
}

#: The demo's embedded default: a small Llama-shaped model with seeded random weights.
DEMO_ARCH = "llama"
DEMO_CONFIG = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=1024,
    max_position_embeddings=1024,
)


def tiny_config(arch: str, attn_implementation: str | None = None, **overrides):
    """A shrunk ``AutoConfig.for_model(arch)``; unknown keys for an architecture are skipped."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(arch)
    except (ValueError, KeyError) as e:
        raise ValueError(f"detcompile: unknown model architecture {arch!r} ({e})") from None
    sizes = {**TINY, **EXTRA.get(arch, {}), **overrides}
    for key, value in sizes.items():
        if hasattr(cfg, key) or key in overrides or key in EXTRA.get(arch, {}):
            try:
                setattr(cfg, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    if getattr(cfg, "layer_types", None) is not None:
        # Hybrid configs list a type per layer; keep the list as long as the shrunk model.
        types = list(cfg.layer_types)
        n = cfg.num_hidden_layers
        cfg.layer_types = (types * n)[:n] if types else types
        if arch == "gemma2":
            cfg.layer_types = ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(
    arch: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides,
):
    """A model of ``arch`` with tiny sizes and seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = tiny_config(arch, attn_implementation=attn_implementation, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if arch in ("bert", "roberta") else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=dtype) if _accepts_dtype() else auto.from_config(cfg, torch_dtype=dtype)
    return model.to(device).eval()


#: On a GPU the stock kernels pick their reduction order by shape only for realistic widths, so the
#: demo uses a wider (still random, ~0.3B-parameter) model there.
DEMO_CONFIG_GPU = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    config = DEMO_CONFIG_GPU if torch.device(device).type == "cuda" else DEMO_CONFIG
    return tiny_model(DEMO_ARCH, dtype=dtype, device=device, seed=seed, **config)


def _accepts_dtype() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5
