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


def tiny_config(arch: str, attn_implementation: str | None = None, width: int | None = None, **overrides):
    """A shrunk ``AutoConfig.for_model(arch)``; unknown keys for an architecture are skipped.

    The architectures of ``EXTRA`` (and Bloom) keep the original recipe (shared sizes set on the
    default config); every other architecture goes through :func:`_generic_tiny_config`, which shrinks
    the whole config dict (sub-configs, per-layer lists, MoE/MLA/SSM sizes) and rebuilds the config.

    ``width`` (a multiple of 64; default: 64) sets the hidden size and the sizes tied to it, vocabulary
    included (:func:`width_sizes`), so that a sweep reaches the matmul launch configurations of wider
    models; layer and expert counts stay tiny. ``width=64`` is the default tiny config.
    """
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(arch)
    except (ValueError, KeyError) as e:
        raise ValueError(f"detcompile: unknown model architecture {arch!r} ({e})") from None
    except Exception:  # noqa: BLE001  (a default config that fails its own validation)
        if arch not in GENERIC_EXTRA or arch in _ORIGINAL_RECIPE:
            raise
        cfg = None
    if arch not in _ORIGINAL_RECIPE:
        cfg = _generic_tiny_config(arch, cfg, overrides, width)
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        return cfg
    extra = _scaled(EXTRA.get(arch, {}), width)
    sizes = {**_scaled(TINY, width), **extra, **overrides}
    for key, value in sizes.items():
        if hasattr(cfg, key) or key in overrides or key in extra:
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


def _scaled(sizes: dict, width: int | None) -> dict:
    """The original recipe's sizes (``TINY``, ``EXTRA``) at ``width``: each width-tied key takes its size."""
    if width is None:
        return sizes
    w = width_sizes(width)
    return {k: w[_KIND[k]] if k in _KIND else w["head_dim"] if k == "query_pre_attn_scalar" else v
            for k, v in sizes.items()}


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


def demo_overrides(device: str | torch.device) -> dict:
    """The demo model's size for ``device`` (``tiny_config(DEMO_ARCH, **demo_overrides(device))``)."""
    return DEMO_CONFIG_GPU if torch.device(device).type == "cuda" else DEMO_CONFIG


def demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    return tiny_model(DEMO_ARCH, dtype=dtype, device=device, seed=seed, **demo_overrides(device))


def _accepts_dtype() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


# ------------------------------------------------------------------------------------------------
# Tiny configs for every other architecture (the architecture sweep, benchmarks/model_sweep.py).
# ------------------------------------------------------------------------------------------------

#: Architectures built by the original recipe above; tests/models checks them, so their configs stay as they were.
_ORIGINAL_RECIPE = frozenset(EXTRA) | {"llama", "bloom"}

#: key -> tiny value; a config value (at any depth: text, vision, audio sub-configs) is capped to it.
_CAPS: dict[str, int] = {}
#: key -> which size it is ("hidden", "ffn", "half", "heads", "head_dim", "vocab"): the caps that ``width``
#: scales (:func:`width_sizes`); every other cap stays as written.
_KIND: dict[str, str] = {}

#: The width the caps are written for: ``tiny_config(arch, width=BASE_WIDTH)`` is the default tiny config.
BASE_WIDTH = 64


def _cap(value: int, *keys: str, kind: str | None = None) -> None:
    for key in keys:
        _CAPS[key] = value
        if kind is not None:
            _KIND[key] = kind


def width_sizes(width: int) -> dict[str, int]:
    """The sizes of a tiny model of hidden size ``width``: FFN 2x, MoE experts/latent ranks 1/2x, attention
    heads of width 64 from 4 per 256 (4 heads of 16 at the base width 64), so that the head dim stays realistic
    and ``heads * head_dim == width``. The vocabulary grows as the width squared (256 at 64, 4096 at 256, 65536
    at 1024, at most 262144): the LM head is a model's widest matmul, and on the GPU only an N of several
    thousand columns selects the large-tile, deep-pipeline launch configurations (``select_config``)."""
    if width < BASE_WIDTH or width % BASE_WIDTH:
        raise ValueError(f"detcompile: width must be a multiple of {BASE_WIDTH}, got {width}")
    heads = 4 * max(1, width // 256)
    if width % heads:
        raise ValueError(f"detcompile: width {width} does not split into {heads} heads; use a multiple of 256")
    vocab = min(256 * (width // BASE_WIDTH) ** 2, 262144)
    return {"hidden": width, "ffn": 2 * width, "half": width // 2, "heads": heads, "head_dim": width // heads,
            "vocab": vocab}


def _caps(width: int | None) -> dict[str, int]:
    if width is None:
        return _CAPS
    sizes = width_sizes(width)
    return {key: sizes[_KIND[key]] if key in _KIND else value for key, value in _CAPS.items()}


_cap(64, "hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "embedding_dim", "embedding_size",
     "word_embed_proj_dim", "model_dim", "attention_hidden_size", "out_hidden_size", "text_hidden_size",
     "hidden_dim", kind="hidden")
_cap(128, "mamba_d_ssm", "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "d_inner",
     "ffn_hidden_size", "dim_feedforward", "mlp_dim", "intermediate_dim", kind="ffn")
_cap(32, "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
     "expert_intermediate_size", "moe_ffn_hidden_size", "shared_intermediate_size",
     "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size", "kv_lora_rank", "q_lora_rank", kind="half")
# Attention head counts scale with the width; expert and linear-attention head counts do not.
_cap(4, "num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
     "num_heads", "attention_heads", kind="heads")
_cap(4, "index_n_heads", "linear_num_value_heads", "num_experts",
     "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts", "n_experts")
_cap(2, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "kv_n_heads",
     "linear_num_key_heads", "num_experts_per_tok", "moe_topk", "top_k", "moe_top_k", "num_experts_per_token",
     "top_k_experts", "experts_per_token", "num_selected_experts", "moe_k")
# Attention head dims scale (heads * head_dim == width); latent-attention (MLA) and SSM dims do not.
_cap(16, "head_dim", "kv_channels", "attention_head_dim", "head_size", kind="head_dim")
_cap(16, "index_head_dim", "v_head_dim",
     "linear_key_head_dim", "linear_value_head_dim", "mamba_head_dim", "mamba_d_head", "state_size",
     "mamba_d_state", "ssm_state_size", "d_state", "hidden_size_per_layer_input")
_cap(8, "qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "time_step_rank", "mamba_dt_rank", "dt_rank",
     "sliding_window", "attention_chunk_size")
_cap(256, "vocab_size", kind="vocab")
_cap(256, "vocab_size_per_layer_input")
_cap(512, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
     "max_sequence_length")
_cap(1, "n_shared_experts", "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
     "decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step", "n_groups", "mamba_n_groups")
_cap(0, "num_nextn_predict_layers")
_cap(64, "emb_dim", "lru_width", "ple_embed_dim", "adapter_in_dim", "adapter_out_dim",
     "adapter_input_size", kind="hidden")
_cap(16, "d_head", kind="head_dim")
_cap(16, "linear_head_dim", "mamba_headdim", "hc_lowrank", "adapter_rank")
_cap(4, "linear_num_heads", "heads_per_ngram")
_cap(8, "attention_window_size", "local_attention_window_len")
_cap(1, "num_expert_group", "num_dense_layers")
_cap(512, "encoder_hash_byte_group_vocab", "ngram_vocab_size_base", "model_max_length")

#: Keys holding a number of layers: set to the number of layers kept.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "num_blocks", "depth")

#: Per-architecture settings on top of the generic shrinking (keys of the top-level config dict).
GENERIC_EXTRA = {
    # Values the default config leaves unset (None) or sets inconsistently for this transformers version.
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "bamba": dict(attn_layer_indices=[1]),  # the default has no attention layer
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # default: no attention layer
    "deepseek_v2": dict(num_experts_per_tok=2),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
    "hrm_text": dict(num_layers_per_stack=1, num_hidden_layers=8),  # H_cycles * (L_cycles + 1) stacks
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=4),
    "recurrent_gemma": dict(num_hidden_layers=3),  # block_types is a 3-layer pattern with one attention layer
    "xlstm": dict(qk_dim_factor=1.0),  # the native recurrent step sizes its state with the value head dim
    "zamba": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2, attention_hidden_size=128,
                  attention_head_dim=32),  # attention runs on concat(hidden, embeddings): 2 * hidden_size
    "zamba2": dict(attention_hidden_size=128, attention_head_dim=32, kv_channels=16),
    "mamba2": dict(num_heads=8, head_dim=16, expand=2),  # num_heads * head_dim = expand * hidden_size
    "musicgen": dict(decoder=dict(num_codebooks=1)),  # one codebook: input ids [batch, seq]
    "musicgen_melody": dict(decoder=dict(num_codebooks=1)),
    "reformer": dict(axial_pos_shape=[16, 32], axial_pos_embds_dim=[32, 32], is_decoder=True),
}
GENERIC_EXTRA["qwen4_exp"] = dict(text_config=GENERIC_EXTRA["qwen4_exp_text"])

#: The width-tied values of ``GENERIC_EXTRA`` (and of other per-architecture sizes), from :func:`width_sizes`,
#: applied when a width is given; at the base width they are the default tiny config's (a test checks it).
WIDTH_EXTRA = {
    "zamba": lambda w: dict(attention_hidden_size=2 * w["hidden"], attention_head_dim=2 * w["hidden"] // w["heads"]),
    "zamba2": lambda w: dict(attention_hidden_size=2 * w["hidden"], attention_head_dim=2 * w["hidden"] // w["heads"],
                             kv_channels=w["head_dim"], n_mamba_heads=2 * w["hidden"] // 16),  # expand 2, head dim 16
    "mamba2": lambda w: dict(num_heads=2 * w["hidden"] // 16),  # expand 2, head dim 16
    "reformer": lambda w: dict(axial_pos_embds_dim=[w["hidden"] // 2, w["hidden"] // 2]),  # sums to the hidden size
    "qwen4_exp_text": lambda w: dict(indexer_head_dim=w["head_dim"]),  # holds the attention's rotary dims
}
WIDTH_EXTRA["qwen4_exp"] = lambda w: dict(text_config=WIDTH_EXTRA["qwen4_exp_text"](w))

_MAX_KEPT_LAYERS = 6


def _n_layers(d: dict) -> int | None:
    """The number of layers whose per-layer lists the config holds (``num_hidden_layers``, else the largest)."""
    v = d.get("num_hidden_layers")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    counts = [d[k] for k in _LAYER_KEYS if isinstance(d.get(k), int) and not isinstance(d[k], bool) and d[k] > 0]
    return max(counts) if counts else None


def _kept_layers(d: dict, n_old: int) -> list[int]:
    """Which of the ``n_old`` layers to keep: layer 0, plus the first layer of every kind that a per-layer
    list (``layer_types``, ``mlp_layer_types``...), a layer-index list or ``per_layer_config`` names."""
    keep = [0]

    def add(i: int) -> None:
        if i not in keep and len(keep) < _MAX_KEPT_LAYERS:
            keep.append(i)

    for key, v in d.items():
        if not isinstance(key, str):
            continue
        if isinstance(v, (list, tuple)) and len(v) == n_old and n_old >= 3:
            seen = []
            for i, item in enumerate(v):
                try:
                    hash(item)
                except TypeError:
                    item = repr(item)
                if item not in seen:
                    seen.append(item)
                    add(i)
        elif _is_layer_index_list(key, v, n_old):
            for i in sorted(v)[:1]:
                add(i)
    per_layer = d.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        add(min(int(k) for k in per_layer))
    if len(keep) == 1 and n_old > 1:
        keep.append(1)
    return sorted(keep)


def _is_layer_index_list(key: str, v, n_old: int) -> bool:
    return (
        isinstance(v, (list, tuple)) and len(v) > 0 and len(v) != n_old
        and any(w in key for w in ("layer", "index", "indices", "idx"))
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_old for i in v)
    )


def _shrink_dict(d: dict, token_map: dict[int, int], vocab: int, caps: dict[str, int] = _CAPS,
                 exact: frozenset[str] = frozenset()) -> dict:
    """The shrunk copy of one (sub-)config dict; the keys of ``exact`` are set to their cap, not capped."""
    out = dict(d)
    n_old = _n_layers(d)
    keep = _kept_layers(d, n_old) if n_old else None
    for key, v in d.items():
        if not isinstance(key, str):
            continue
        if isinstance(v, dict) and ("model_type" in v or key.endswith("_config") or key in ("decoder", "encoder")):
            out[key] = _shrink_dict(v, token_map, vocab, caps, exact)
        elif isinstance(v, bool) or v is None:
            continue
        elif key in _LAYER_KEYS and isinstance(v, int) and keep is not None and v > len(keep):
            out[key] = len(keep)
        elif key == "num_kv_shared_layers" and isinstance(v, int) and keep is not None:
            out[key] = len(keep) if v == n_old else 0  # all shared (assistant models) or none
        elif key in exact and isinstance(v, int) and v > 0:
            out[key] = caps[key]
        elif key in caps and isinstance(v, int) and v > caps[key]:
            out[key] = caps[key]
        elif key.endswith("_layer_period") and isinstance(v, int) and v > 2:
            out[key] = 2
        elif key.endswith("_layer_offset") and isinstance(v, int) and v > 1:
            out[key] = 1
        elif keep is not None and isinstance(v, (list, tuple)) and len(v) == n_old and n_old >= 3:
            out[key] = type(v)(v[i] for i in keep)
        elif keep is not None and _is_layer_index_list(key, v, n_old):
            out[key] = type(v)(j for j, i in enumerate(keep) if i in set(v))
    if keep is not None and isinstance(d.get("per_layer_config"), dict):
        per_layer = {int(k): v for k, v in d["per_layer_config"].items()}
        out["per_layer_config"] = {
            f"{j:02d}": _shrink_dict(per_layer[i], token_map, vocab, caps, exact)
            for j, i in enumerate(keep) if i in per_layer
        }
    if "max_window_layers" in out and keep is not None and isinstance(out["max_window_layers"], int):
        out["max_window_layers"] = min(out["max_window_layers"], len(keep))
    hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        # Left unset by some defaults, though the modeling code reads them.
        if "head_dim" in out and out["head_dim"] is None:
            out["head_dim"] = hidden // heads
        if "num_key_value_heads" in out and out["num_key_value_heads"] is None:
            out["num_key_value_heads"] = min(2, heads)
    # Mamba-2 mixers: heads * head dim = the mixer width (mamba_d_ssm where set, else expand * hidden size).
    if isinstance(hidden, int) and isinstance(out.get("mamba_n_heads"), int) and isinstance(out.get("mamba_d_head"), int):
        width = out.get("mamba_d_ssm") or out.get("mamba_expand", 2) * hidden
        out["mamba_n_heads"] = max(1, width // out["mamba_d_head"])
    # Multi-head latent attention (DeepSeek-style): one latent for all heads (as many KV heads as heads), and
    # the rope part is the "head_dim" of the rotary embedding.
    if "kv_lora_rank" in d and isinstance(heads, int) and isinstance(out.get("num_key_value_heads"), int):
        out["num_key_value_heads"] = heads
    if "kv_lora_rank" in d and isinstance(d.get("qk_rope_head_dim"), int):
        if d.get("head_dim") == d["qk_rope_head_dim"]:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in d:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
    # Special token ids past the shrunk vocabulary: distinct ids at its top.
    for key, v in d.items():
        if isinstance(key, str) and key.endswith(("token_id", "token_index", "token_ids")):
            out[key] = _remap_ids(v, token_map, vocab)
    return out


def _remap_ids(v, token_map: dict[int, int], vocab: int):
    if isinstance(v, (list, tuple)):
        return type(v)(_remap_ids(x, token_map, vocab) for x in v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
        if v not in token_map:
            token_map[v] = vocab - 1 - len(token_map)
        return token_map[v]
    return v


def _merge(d: dict, extra: dict) -> dict:
    out = dict(d)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _generic_tiny_config(arch: str, cfg, overrides: dict, width: int | None = None):
    if cfg is None:  # the default config does not validate: start from the per-architecture settings
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(arch, **GENERIC_EXTRA.get(arch, {}))
    d = cfg.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    # At a given width every width-tied size is set (not only capped): a default config narrower than the
    # width, or with fewer heads, would otherwise mix its own sizes with the width's (heads not dividing).
    exact = frozenset(_KIND) if width is not None else frozenset()
    caps = _caps(width)
    d = _shrink_dict(d, {}, caps["vocab_size"], caps, exact)
    d = _merge(d, GENERIC_EXTRA.get(arch, {}))
    if width is not None and arch in WIDTH_EXTRA:
        d = _merge(d, WIDTH_EXTRA[arch](width_sizes(width)))
    d = _merge(d, overrides)
    d.pop("model_type", None)
    return type(cfg).from_dict(d)


def special_token_ids(cfg) -> set[int]:
    """Every special token id a config names (pad, bos, image...), at any depth: inputs avoid them."""
    ids: set[int] = set()

    def walk(d):
        for key, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(key, str) and key.endswith(("token_id", "token_index", "token_ids")):
                for x in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(x, int) and not isinstance(x, bool):
                        ids.add(x)

    walk(cfg.to_dict())
    return ids


def tiny_causal_lm(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                   width: int | None = None):
    """The causal-LM class of ``arch`` (``MODEL_FOR_CAUSAL_LM_MAPPING``) on its tiny config, in eval mode.

    Encoder-style configs (BERT, RoBERTa...) get ``is_decoder=True``; a composite config whose causal-LM
    class takes one of its sub-configs (MusicGen's decoder) passes that sub-config. ``width``: see
    :func:`tiny_config`.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = tiny_config(arch, width=width)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch])
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want):
        subs = [getattr(cfg, k) for k in vars(cfg) if isinstance(getattr(cfg, k, None), want)]
        if subs:
            cfg = subs[0]
    if getattr(cfg, "is_decoder", None) is False and not getattr(cfg, "is_encoder_decoder", False):
        cfg.is_decoder = True
    torch.manual_seed(seed)
    kw = {"dtype": dtype} if _accepts_dtype() else {"torch_dtype": dtype}
    model = cls._from_config(cfg, **kw)
    if hasattr(model, "set_default_language") and getattr(cfg, "languages", None):
        model.set_default_language(cfg.default_language or cfg.languages[0])
    return model.to(device).eval()


def tiny_tokenizer():
    """A character-level tokenizer built locally (no download): ids 0-3 are <pad>, <s>, </s>, <unk>;
    printable ASCII and newline follow (100 ids, so it fits every tiny config's vocabulary). It gives
    the tiny models and the demo text prompts, stop strings and decoded text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


#: Llama-3-8B's shapes: the realistic GPU model of the benchmarks and the server's load tests.
LLAMA3_8B_CONFIG = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
)


def _no_init():
    """transformers' no_init_weights (the weights are set right after), if this version has it."""
    import contextlib

    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights(), "no_init_weights"
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext(), "hf_init"


def random_llama(config: dict, dtype: torch.dtype, device, seed: int = 0):
    """A Llama of ``config`` built directly on ``device`` with seeded random weights: 2-D weights
    ~ N(0, 0.02), norm weights 1 (seconds for 8B on a GPU; HF's own init is skipped). Returns
    (model in eval mode, how the init was skipped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    ctx, how = _no_init()
    with device, ctx:
        model = LlamaForCausalLM._from_config(LlamaConfig(**config), dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model.eval(), how
