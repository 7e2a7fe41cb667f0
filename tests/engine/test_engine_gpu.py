"""GPU-only engine checks: CUDA-graph decode equals eager decode (with padded graph batches), long
shared prefixes cut at 1 / 511 / 2048 / 4097 tokens, and MoE decode and mixed steps captured in CUDA graphs."""
import pytest
import torch

from detcompile.engine import SamplingParams
from detcompile.models import tiny_causal_lm

from ._util import fingerprint, make_engine, prompts

pytestmark = pytest.mark.gpu

WIDE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            vocab_size=4096, num_hidden_layers=2, max_position_embeddings=8192)
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_new_tokens=12, logprobs=1)


def test_cuda_graph_decode_equals_eager_decode():
    rng = torch.Generator().manual_seed(1)
    graphs = make_engine(device="cuda", dtype=torch.bfloat16, config=WIDE, kv_cache_bytes=1 << 30, max_model_len=512)
    eager = make_engine(device="cuda", dtype=torch.bfloat16, config=WIDE, kv_cache_bytes=1 << 30, max_model_len=512,
                        cuda_graphs=False)
    assert graphs.runner.graphs and not eager.runner.graphs
    for n in (1, 3, 5, 9):  # 3, 5, 9 decode in padded graph batches of 4, 8, 16
        ps = prompts(rng, [int(x) for x in torch.randint(2, 60, (n,), generator=rng)], graphs.vocab_size)
        a = [fingerprint(o) for o in graphs.generate(ps, PARAMS, use_tqdm=False)]
        b = [fingerprint(o) for o in eager.generate(ps, PARAMS, use_tqdm=False)]
        assert a == b, n


def test_cuda_graph_mixed_steps_equal_eager_steps():
    # Prompts of 2..700 tokens arriving together and in waves, chunked at 256 tokens: the prefill
    # steps (chunks next to decode tokens) replay the mixed-step graphs, padded to their token
    # buckets; every token and logprob equals the eager engine's.
    rng = torch.Generator().manual_seed(5)
    kw = dict(device="cuda", dtype=torch.bfloat16, config=WIDE, kv_cache_bytes=1 << 30, max_model_len=1024,
              chunked_prefill_size=256)
    graphs, eager = make_engine(**kw), make_engine(cuda_graphs=False, **kw)
    assert graphs.runner.mixed_graphs and not eager.runner.mixed_graphs
    lengths = [int(x) for x in torch.randint(2, 700, (9,), generator=rng)] + [1, 255, 256, 257]
    ps = prompts(rng, lengths, graphs.vocab_size)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_new_tokens=6, logprobs=1,
                             prompt_logprobs=0 if i % 4 == 0 else None) for i in range(len(ps))]
    a = [fingerprint(o) for o in graphs.generate(ps, params, use_tqdm=False)]
    b = [fingerprint(o) for o in eager.generate(ps, params, use_tqdm=False)]
    assert a == b
    kinds = graphs.runner.step_kinds
    assert kinds["mixed graph"] > 0 and kinds["decode graph"] > 0, kinds
    assert eager.runner.step_kinds.keys() == {"eager"}


def test_long_shared_prefix_cut_points():
    rng = torch.Generator().manual_seed(2)
    eng = make_engine(device="cuda", dtype=torch.bfloat16, config=WIDE, kv_cache_bytes=4 << 30, max_model_len=4608,
                      chunked_prefill_size=1024, block_size=16)
    base = prompts(rng, [4200], eng.vocab_size)[0]
    suffixes = prompts(rng, [7, 3, 11, 5], eng.vocab_size)
    ps = [base[:cut] + s for cut, s in zip((1, 511, 2048, 4097), suffixes)]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=0)
    alone = []
    for p in ps:
        eng.flush_cache()
        alone.append(fingerprint(eng.generate(p, params, use_tqdm=False)[0]))
    eng.flush_cache()
    eng.generate(base[:4100], SamplingParams(temperature=0.0, max_new_tokens=1), use_tqdm=False)
    outs = eng.generate(ps, params, use_tqdm=False)
    assert [fingerprint(o) for o in outs] == alone
    assert [o.num_cached_tokens for o in outs][1:] == [496, 2048, 4096]


# mixtral / qwen3_moe: experts [G, N, K] passed transposed; gpt_oss: [G, K, N] experts with biases.
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_steps_are_captured_and_equal_eager(arch):
    rng = torch.Generator().manual_seed(4)
    model = tiny_causal_lm(arch, dtype=torch.bfloat16, device="cuda")
    from detcompile.engine import Engine

    kw = dict(max_num_seqs=8, block_size=4, max_model_len=128, kv_cache_bytes=256 << 20, log=lambda m: None)
    with_graphs = Engine(model, **kw)
    runner = with_graphs.runner
    assert runner.graphs and runner.mixed_graphs, "MoE steps fell back to eager: a host sync is left in the step"
    ps = prompts(rng, [5, 17, 9], with_graphs.vocab_size)
    a = [fingerprint(o) for o in with_graphs.generate(ps, PARAMS, use_tqdm=False)]
    assert runner.step_kinds["mixed graph"] > 0 and runner.step_kinds["decode graph"] > 0, runner.step_kinds
    eager = Engine(model, cuda_graphs=False, **kw)
    assert a == [fingerprint(o) for o in eager.generate(ps, PARAMS, use_tqdm=False)]
