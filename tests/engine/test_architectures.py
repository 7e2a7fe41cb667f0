"""The engine serves every decoder-only family it claims, with the same bits alone and in a batch,
and prefill (score) equal to decode. Tiny float32 configs on the CPU; bf16 and CUDA graphs on the GPU."""
import pytest
import torch

from detcompile.engine import Engine, SamplingParams
from detcompile.models import tiny_causal_lm

from .._subset import cpu_subset
from ._util import fingerprint, prompts

ARCHS = ["llama", "qwen3", "mistral", "gemma2", "gpt2", "mixtral", "qwen3_moe", "phi3", "gpt_neox", "opt", "gpt_oss"]


def check(model, device):
    eng = Engine(model, max_num_seqs=8, chunked_prefill_size=16, block_size=4, max_model_len=64,
                 kv_cache_bytes=64 << 20, log=lambda m: None)
    rng = torch.Generator().manual_seed(3)
    ps = prompts(rng, [5, 23, 9], eng.vocab_size)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=6, logprobs=1)
    batch = eng.generate(ps, params, use_tqdm=False)
    for p, out in zip(ps, batch):
        eng.flush_cache()
        assert fingerprint(eng.generate(p, params, use_tqdm=False)[0]) == fingerprint(out)
        assert eng.score(p, out.token_ids) == out.logprobs


@pytest.mark.parametrize("arch", cpu_subset(ARCHS, keep=["llama", "gemma2", "gpt2", "mixtral", "gpt_oss"]))
def test_engine_architecture_cpu(arch):
    check(tiny_causal_lm(arch), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_architecture_gpu_bf16_cuda_graphs(arch):
    check(tiny_causal_lm(arch, dtype=torch.bfloat16, device="cuda"), "cuda")
