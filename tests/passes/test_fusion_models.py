"""The fusion passes (rotary, silu_mul, linear_swiglu) on tiny models: how many patterns each rewrites,
and logits bitwise equal to the same compile without them (CPU; GPU-marked: CUDA, bf16/fp16)."""
import pytest
import torch

from detcompile.models import tiny_model

from ._util import compiled_logits

LAYERS = 2  # detcompile.models.TINY
FUSIONS = ("rotary", "silu_mul", "linear_swiglu")


@pytest.mark.parametrize("arch, dtype, rotary, silu_mul, swiglu", [
    ("llama", torch.bfloat16, 2 * LAYERS, LAYERS, LAYERS),  # q and k of every layer; every MLP
    ("qwen3", torch.float32, 2 * LAYERS, LAYERS, LAYERS),  # q/k norms before the rotary
    ("mistral", torch.bfloat16, 2 * LAYERS, LAYERS, LAYERS),
    ("gemma2", torch.float32, 2 * LAYERS, 0, 0),  # GeGLU: no silu
    ("phi3", torch.float32, 2 * LAYERS, LAYERS, 0),  # up * silu(gate), halves of one projection: no group
    ("gpt_neox", torch.bfloat16, 2 * LAYERS, 0, 0),  # partial rotary: the rotated slice
    ("gptj", torch.float32, 0, 0, 0),  # interleaved rotary: left alone
])
def test_models_rewritten_and_bitwise_unchanged(arch, dtype, rotary, silu_mul, swiglu):
    model = tiny_model(arch, dtype=dtype)
    ids = torch.randint(3, 250, (3, 11), generator=torch.Generator().manual_seed(0))
    fused, counts = compiled_logits(model, ids)
    assert tuple(counts.get(name, 0) for name in FUSIONS) == (rotary, silu_mul, swiglu)
    if rotary or silu_mul:
        plain, off = compiled_logits(model, ids, disable=FUSIONS)
        assert not set(off) & set(FUSIONS)
        assert torch.equal(fused, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq", [37, 5])  # 3 x 5 tokens: the decode-sized one-launch linear_swiglu kernel
def test_gpu_model_bitwise_unchanged(dtype, seq, monkeypatch):
    monkeypatch.setenv("DETCOMPILE_SWIGLU_ONE_LAUNCH", "1")  # linear_swiglu's kernel (off by default for now)
    # Head dim 128 and an MLP wider than one 1024-column block, as in the real models.
    model = tiny_model("llama", dtype=dtype, device="cuda", hidden_size=512, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=128, intermediate_size=1408)
    ids = torch.randint(3, 250, (3, seq), generator=torch.Generator().manual_seed(0)).cuda()
    fused, counts = compiled_logits(model, ids)
    plain, _ = compiled_logits(model, ids, disable=FUSIONS)
    assert tuple(counts.get(name) for name in FUSIONS) == (2 * LAYERS, LAYERS, LAYERS)
    assert torch.equal(fused, plain)
