"""What ``detcompile serve --model`` loads: a local checkpoint directory, or a named model built
locally with seeded random weights (no download), each with a tokenizer.

- ``demo`` (the default): the embedded demo model (``detcompile.models.demo_model``) and the local
  character-level tokenizer (``detcompile.models.tiny_tokenizer``);
- ``tiny``: a smaller 2-layer Llama (vocabulary 256): the tests' model, it compiles fastest;
- ``llama3-8b-random``: Llama-3-8B's shapes with random bf16 weights (CUDA only), for load tests;
- a directory: a Hugging Face checkpoint and its tokenizer (``--tokenizer tiny`` if it has none).
"""
from __future__ import annotations

import os

import torch

NAMED = ("demo", "tiny", "llama3-8b-random")



def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device):
    if dtype == "auto":
        return None
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16; got {dtype!r}") from None


def load_model(name_or_path: str, *, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None,
               seed: int = 0):
    """(model or checkpoint path, tokenizer or None, display name). A path is handed to the Engine,
    which loads it; named models are built here."""
    from ..models import LLAMA3_8B_CONFIG, demo_model, random_llama, tiny_model, tiny_tokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = tiny_tokenizer() if tokenizer == "tiny" else None
    if tokenizer not in (None, "tiny"):
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer):
            raise ValueError(f"--tokenizer {tokenizer!r}: expected 'tiny' or a local tokenizer directory")
        tok = AutoTokenizer.from_pretrained(tokenizer)
    if name_or_path == "demo":
        model = demo_model(dtype=dt or (torch.bfloat16 if dev.type == "cuda" else torch.float32), device=dev, seed=seed)
        return model, tok or tiny_tokenizer(), "detcompile-demo"
    if name_or_path == "tiny":
        model = tiny_model("llama", dtype=dt or torch.float32, device=dev, seed=seed)
        return model, tok or tiny_tokenizer(), "detcompile-tiny"
    if name_or_path == "llama3-8b-random":
        if dev.type != "cuda":
            raise ValueError("--model llama3-8b-random needs a CUDA GPU (16 GB of bf16 weights)")
        model, _ = random_llama(LLAMA3_8B_CONFIG, dt or torch.bfloat16, dev, seed)
        return model, tok or tiny_tokenizer(), "llama3-8b-random"
    if not os.path.isdir(name_or_path):
        raise ValueError(f"--model {name_or_path!r} is neither a local checkpoint directory nor one of "
                         f"{', '.join(NAMED)} (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt or "auto").to(dev).eval()
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception:  # noqa: BLE001  (no tokenizer files: token-id prompts still work)
            tok = None
    return model, tok, os.path.basename(os.path.normpath(name_or_path))


def model_skeleton(name_or_path: str, *, device: str = "auto"):
    """The modules ``load_model`` would build, on the meta device (no weights, no memory, no compile):
    what ``serve --tp`` checks before it starts any rank."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..models import DEMO_ARCH, LLAMA3_8B_CONFIG, demo_overrides, tiny_config

    if name_or_path == "demo":  # demo_model's config, which depends on the device
        config = tiny_config(DEMO_ARCH, **demo_overrides(resolve_device(device)))
    elif name_or_path == "tiny":
        config = tiny_config("llama")
    elif name_or_path == "llama3-8b-random":
        config = LlamaConfig(**LLAMA3_8B_CONFIG)
    elif os.path.isdir(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path)
    else:
        raise ValueError(f"--model {name_or_path!r} is neither a local checkpoint directory nor one of "
                         f"{', '.join(NAMED)} (nothing is downloaded)")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
