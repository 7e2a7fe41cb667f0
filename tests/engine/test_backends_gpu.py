"""The engine's determinism checks for each attention backend on the GPU (issue #14): the cells of
docs/attention_backends.md. Within a backend every path must give a token the same bits; across
backends the bits may differ (other reduction orders), so each backend is compared with itself
only, and with the model's own attention numerically (a sanity check of the math, not of bits).

Cells (test name -> column): test_cuda_graph_equals_eager -> CUDA graph, test_chunked_prefill_equals_unchunked
-> chunked prefill, test_radix_cache_hit_equals_uncached -> radix cache, test_non_greedy_sampling_in_any_batch
-> non-greedy sampling, test_prefill_equals_decode -> prefill = decode, test_greedy_in_any_batch -> any
batch (greedy); test_head_dim_128 covers the other head dim. ``benchmarks/backends_gpu_check.sh`` runs
them and prints the table. A backend whose package is not importable is skipped, naming why."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

from detcompile.engine import SamplingParams

from ._util import alone, distinct, fingerprint, make_engine, prompts

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "fa3", "flashinfer"]
PACKAGES = {"fa3": "fa3_fwd_interface", "flashinfer": "flashinfer"}
CONFIG = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              vocab_size=4096, num_hidden_layers=2, max_position_embeddings=1024)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=2)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_new_tokens=8, logprobs=2)


def build(backend: str, **config):
    """A bf16 engine on the backend: CUDA graphs on, chunks of 64 tokens (prompts longer than that
    are chunked next to decode rows), the backend's own page size (FA3: 128 tokens)."""
    return make_engine(device="cuda", dtype=torch.bfloat16, config={**CONFIG, **config}, kv_cache_bytes=1 << 30,
                       max_model_len=1024, chunked_prefill_size=64, block_size=None, attention_backend=backend)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    name = request.param
    if name in PACKAGES:
        try:
            importlib.import_module(PACKAGES[name])
        except Exception as e:  # noqa: BLE001  (a broken install is a skip with its reason, as a missing one)
            pytest.skip(f"{PACKAGES[name]} is not importable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return name


@pytest.fixture(scope="module")
def engine(backend):
    eng = build(backend)
    runner = eng.runner
    assert runner.attention_backend == backend and (runner.backend is None) == (backend == "triton")
    assert runner.graphs and runner.mixed_graphs, "CUDA graphs were not captured (capture failed: see warnings)"
    return eng


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(99)


def lengths(rng, n, low, high):
    return [int(x) for x in torch.randint(low, high, (n,), generator=rng)]


def test_cuda_graph_equals_eager(engine, rng):
    """Decode steps in padded graph batches, prefill chunks in mixed-step graphs: the same bits as
    the same engine's eager steps (its graphs set aside)."""
    runner = engine.runner
    ps = prompts(rng, lengths(rng, 9, 2, 400) + [1, 63, 64, 65, 129], engine.vocab_size)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_new_tokens=6, logprobs=1,
                             prompt_logprobs=0 if i % 4 == 0 else None) for i in range(len(ps))]
    waves = [ps[:1], ps[:3], ps[:5], ps]
    runner.step_kinds.clear()
    engine.flush_cache()
    with_graphs = [[fingerprint(o) for o in engine.generate(w, params[:len(w)], use_tqdm=False)] for w in waves]
    kinds = dict(runner.step_kinds)
    assert kinds.get("decode graph", 0) > 0 and kinds.get("mixed graph", 0) > 0, kinds
    saved = runner.graphs, runner.mixed_graphs
    runner.graphs, runner.mixed_graphs = {}, {}
    try:
        runner.step_kinds.clear()
        engine.flush_cache()
        eager = [[fingerprint(o) for o in engine.generate(w, params[:len(w)], use_tqdm=False)] for w in waves]
        assert set(runner.step_kinds) == {"eager"}
    finally:
        runner.graphs, runner.mixed_graphs = saved
    assert with_graphs == eager


def test_chunked_prefill_equals_unchunked(engine, rng):
    ps = prompts(rng, [300, 7, 190], engine.vocab_size)
    budget = engine.scheduler.max_num_batched_tokens
    try:
        results = []
        for chunk in (3, 16, 256):  # 256: beyond the graphs' budget, eager steps of long rows
            engine.scheduler.max_num_batched_tokens = chunk
            engine.flush_cache()
            results.append([fingerprint(o) for o in engine.generate(ps, SAMPLED, use_tqdm=False)])
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    assert results[0] == results[1] == results[2]


def test_radix_cache_hit_equals_uncached(engine, rng):
    block = engine.runner.block_size
    base = prompts(rng, [600], engine.vocab_size)[0]
    cuts = (1, block + 1, 2 * block, 3 * block - 1)
    ps = [base[:cut] + sfx for cut, sfx in zip(cuts, prompts(rng, [5, 3, 8, 6], engine.vocab_size))] + [base]
    ref = [alone(engine, p, GREEDY) for p in ps]
    engine.flush_cache()
    engine.generate([base], GREEDY, use_tqdm=False)  # the shared prefix into the cache
    outs = engine.generate(ps, GREEDY, use_tqdm=False)
    assert [fingerprint(o) for o in outs] == ref
    assert [o.num_cached_tokens for o in outs][1:] == [block, 2 * block, 2 * block, (len(base) - 1) // block * block]
    p = prompts(rng, [300], engine.vocab_size)[0]
    engine.flush_cache()
    cold = engine.generate(p, SAMPLED, use_tqdm=False)[0]
    warm = engine.generate(p, SAMPLED, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens >= block
    assert fingerprint(cold) == fingerprint(warm)


def _single_prompt_in_every_batch(engine, rng, params):
    target = prompts(rng, [150], engine.vocab_size)[0]
    seen = [alone(engine, target, params)]
    for bs in range(1, 7):
        others = prompts(rng, lengths(rng, bs - 1, 2, 300), engine.vocab_size)
        at = [0, bs - 1, bs // 2][bs % 3]
        outs = engine.generate(others[:at] + [target] + others[at:], params, use_tqdm=False)
        seen.append(fingerprint(outs[at]))
    assert distinct(seen) == 1
    ps = prompts(rng, [3, 140, 9, 17, 1, 260, 26, 5], engine.vocab_size)
    ref = [alone(engine, p, params) for p in ps]
    order = random.Random(5)
    for _ in range(3):
        idx = order.sample(range(len(ps)), k=order.randint(2, len(ps)))
        outs = engine.generate([ps[i] for i in idx], params, use_tqdm=False)
        assert [fingerprint(o) for o in outs] == [ref[i] for i in idx], idx


def test_non_greedy_sampling_in_any_batch(engine, rng):
    _single_prompt_in_every_batch(engine, rng, SAMPLED)


def test_greedy_in_any_batch(engine, rng):
    _single_prompt_in_every_batch(engine, rng, GREEDY)


def test_prefill_equals_decode(engine, rng):
    """Logprobs of generated tokens (decode steps) == the same tokens re-scored in a prefill."""
    ps = prompts(rng, [6, 130, 257], engine.vocab_size)
    for params in (GREEDY, SAMPLED):
        outs = engine.generate(ps, params, use_tqdm=False)
        assert engine.score(ps, [o.token_ids for o in outs]) == [o.logprobs for o in outs]
        engine.flush_cache()
        assert engine.score(ps[1], outs[1].token_ids) == outs[1].logprobs  # alone, uncached
    p = ps[2]
    out = engine.generate(p, SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert engine.score(p[:1], p[1:]) == out.prompt_logprobs[1:]


def test_numerically_close_to_the_models_own_attention(engine, rng):
    """Not bits: the backend computes attention (scale, causality, GQA, pages) as the model does."""
    ps = prompts(rng, [40, 300], engine.vocab_size)
    outs = engine.generate(ps, GREEDY, use_tqdm=False)
    model, dev = engine.model, engine.runner.device
    for p, out in zip(ps, outs):
        seq = torch.tensor([p + out.token_ids], device=dev)
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        pos = torch.arange(len(p) - 1, seq.shape[1] - 1, device=dev)
        want = lp[pos].gather(1, seq[0, pos + 1][:, None])[:, 0]
        got = torch.tensor(out.logprobs, device=dev)
        assert (got - want).abs().max().item() < 0.1, (got, want)


def test_head_dim_128(backend, rng):
    """The other head dim (FA3: the 128x128 tile instead of 192x128): graphs, chunks, prefill = decode."""
    eng = build(backend, head_dim=128)
    ps = prompts(rng, [5, 200, 70], eng.vocab_size)
    outs = eng.generate(ps, SAMPLED, use_tqdm=False)
    a = [fingerprint(o) for o in outs]
    assert eng.runner.step_kinds["mixed graph"] > 0 and eng.runner.step_kinds["decode graph"] > 0
    assert eng.score(ps, [o.token_ids for o in outs]) == [o.logprobs for o in outs]
    eng.scheduler.max_num_batched_tokens = 7
    eng.flush_cache()
    assert [fingerprint(o) for o in eng.generate(ps, SAMPLED, use_tqdm=False)] == a
