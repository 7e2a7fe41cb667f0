"""Sampler: batch invariance (bitwise), counter-based noise, exact rules, seeded distribution."""
import math

import pytest
import torch

from detcompile.engine.sampler import (
    SamplingBatch, Sampler, mix64, process_logits, sample, token_logprobs, uniform_noise,
)
from detcompile.engine.sampling_params import SamplingParams, mix64 as mix64_int

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MASK = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


@pytest.mark.parametrize("device", DEVICES)
def test_hash_and_uniforms_match_python_reference(device):
    vals = [0, 1, -1, 2**63 - 1, -2**63, 12345678901234567, -987654321]
    got = mix64(torch.tensor(vals, device=device)).tolist()
    assert [g & MASK for g in got] == [mix64_int(v & MASK) for v in vals]
    seeds, pos, V = [7, 2**62 + 3, 0], [0, 5, 123456], 33
    u = uniform_noise(torch.tensor(seeds, device=device), torch.tensor(pos, device=device), V)
    assert u.dtype == torch.float64 and u.shape == (3, V)
    ref = []
    for s, p in zip(seeds, pos):
        key = mix64_int(mix64_int(s) + (p + 1) * G)
        ref.append([((mix64_int(key + (v + 1) * G) >> 12) + 0.5) * 2.0**-52 for v in range(V)])
    assert u.tolist() == ref  # Python floats: exact comparison
    assert 0 < min(min(r) for r in ref) and max(max(r) for r in ref) < 1


def _specs():
    """Six rows exercising every feature: (params, seed, position, prompt, output, banned)."""
    P = SamplingParams
    return [
        (P(temperature=0, top_p=0.5, logprobs=2), 42, 3, [1], [2], None),
        (P(temperature=0.8, top_p=0.9, logprobs=5), 7, 10, [], [], None),
        (P(temperature=1.3, top_k=3, min_p=0.05, logprobs=1, logprobs_mode="processed"),
         11, 4, [5, 6], [], None),
        (P(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
           logprobs=0), 3, 20, [1, 2, 3, 4], [4, 4, 9, 30], None),
        (P(temperature=1.0), 5, 0, [], [], None),
        (P(temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=0.8,
           frequency_penalty=-0.5, logprobs=20, logprobs_mode="processed"),
         2**40, 77, [0, 0, 8], [8, 36], [3, 0]),
    ]


def _run(rows, logits, device):
    b = SamplingBatch.from_params([r[0] for r in rows], [r[2] for r in rows],
                                  seeds=[r[1] for r in rows],
                                  prompt_ids=[r[3] for r in rows],
                                  output_ids=[r[4] for r in rows],
                                  banned_ids=[r[5] or [] for r in rows], device=device)
    return Sampler()(logits.to(device), b), b


def _row(out, i, k):
    k = k or 0
    tops = () if k == 0 else (out.top_ids[i, :k], out.top_logprobs[i, :k])
    return (out.token_ids[i], out.logprobs[i]) + tops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_alone_equals_row_anywhere_in_any_batch(device, dtype):
    V = 37  # odd: rows straddle vector bodies and tails
    gen = torch.Generator().manual_seed(0)
    specs = _specs()
    for t, target in enumerate(specs):
        row = (torch.randn(1, V, generator=gen) * 3).to(dtype)
        alone = _row(_run([target], row, device)[0], 0, target[0].logprobs)
        for size in (2, 5, 9, 19):
            for at in sorted({0, size // 2, size - 1}):
                nbrs = [specs[int(i)] for i in torch.randint(len(specs), (size,), generator=gen)]
                nbrs[at] = target
                logits = (torch.randn(size, V, generator=gen) * 3).to(dtype)
                logits[at] = row[0]
                got = _row(_run(nbrs, logits, device)[0], at, target[0].logprobs)
                assert all(torch.equal(a, g) for a, g in zip(alone, got)), (t, size, at)


def _batch(params, positions, seeds=None, **kw):
    return SamplingBatch.from_params([params] * len(positions), positions, seeds=seeds, **kw)


def test_greedy_is_argmax_lowest_index_and_ignores_filters_and_seed():
    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0, 3.0]]).repeat(50, 1)
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=1, top_p=0.01)):
        for seed in (0, 9):
            out = sample(logits, _batch(p, list(range(50)), [seed] * 50))
            assert torch.equal(out.token_ids, torch.full((50,), 1))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(300, 16)  # flat: the noise alone decides
    p = SamplingParams(temperature=1.0)
    a = sample(logits, _batch(p, list(range(300)), [7] * 300)).token_ids
    b = sample(logits, _batch(p, list(range(300)), [7] * 300)).token_ids
    c = sample(logits, _batch(p, list(range(300)), [8] * 300)).token_ids
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.8  # 15/16 expected to differ
    assert len(torch.unique(a)) == 16  # positions matter too


def test_n_derived_seeds_give_different_reproducible_samples():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 0.1
    p = SamplingParams(seed=7, n=4, temperature=0.9)
    runs = []
    for i in range(4):
        seeds = [p.sample_seed(i)] * 32
        out = sample(logits.repeat(32, 1), _batch(p, list(range(100, 132)), seeds))
        runs.append(tuple(out.token_ids.tolist()))
    assert len(set(runs)) == 4
    plain = sample(logits.repeat(32, 1), _batch(SamplingParams(seed=7, temperature=0.9),
                                                list(range(100, 132))))
    assert tuple(plain.token_ids.tolist()) == runs[0]  # sample 0 is the plain request


def _chi2(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def _softmax(logits, T):
    e = [math.exp(x / T) for x in logits]
    return [v / sum(e) for v in e]


def test_empirical_distribution_matches_softmax_over_temperature():
    logits, T, N = [1.0, 0.2, -0.5, 0.7, -1.5], 0.8, 2000
    out = sample(torch.tensor([logits]).repeat(N, 1),
                 _batch(SamplingParams(temperature=T, seed=123), list(range(N))))
    counts = torch.bincount(out.token_ids, minlength=5).tolist()
    crit = 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    assert _chi2(counts, _softmax(logits, T)) < crit, counts
    # The check has power: the same counts are rejected for a temperature off by 2x either way.
    assert _chi2(counts, _softmax(logits, 2 * T)) > crit
    assert _chi2(counts, _softmax(logits, T / 2)) > crit


P5 = [0.5, 0.3, 0.1, 0.06, 0.04]


@pytest.mark.parametrize("kw,allowed", [
    (dict(top_k=2), [0, 1]),
    (dict(top_p=0.7), [0, 1]),  # sums before: 0, .5, .8 -> token 2 is out
    (dict(top_p=0.85), [0, 1, 2]),
    (dict(min_p=0.25), [0, 1]),  # p >= .125
    (dict(min_p=0.15), [0, 1, 2]),  # p >= .075
    (dict(top_k=4, top_p=0.85), [0, 1, 2]),  # top-p on the top-k renormalised probabilities
    (dict(top_p=1e-6), [0]),  # the top token is always kept
])
def test_filters_never_sample_a_masked_token(kw, allowed):
    N = 1000
    logits = torch.tensor([P5]).log().repeat(N, 1)
    out = sample(logits, _batch(SamplingParams(seed=5, **kw), list(range(N))))
    counts = torch.bincount(out.token_ids, minlength=5).tolist()
    assert [i for i, c in enumerate(counts) if c] == allowed
    if len(allowed) > 1:
        probs = [P5[i] / sum(P5[j] for j in allowed) for i in allowed]
        assert _chi2([counts[i] for i in allowed], probs) < 16.3  # p = 0.001, df <= 2


def test_top_k_ties_at_the_boundary_keep_lowest_indices():
    N = 400
    logits = torch.tensor([[0.0, 2.0, 2.0, 2.0, 1.0]]).repeat(N, 1)
    out = sample(logits, _batch(SamplingParams(top_k=2), list(range(N))))
    assert set(out.token_ids.tolist()) == {1, 2}


def test_banned_tokens_are_never_chosen():
    N = 200
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]]).repeat(N, 1)
    for T in (0.0, 1.0):
        out = sample(logits, _batch(SamplingParams(temperature=T), list(range(N)),
                                    banned_ids=[[1]] * N))
        assert 1 not in out.token_ids.tolist() and 2 in out.token_ids.tolist()
        assert torch.isinf(out.logprobs).logical_not().all()  # raw logprobs: model's logits


def test_penalties_follow_the_exact_rules():
    x = torch.tensor([[0.5, 1.5, -1.5, 2.0, -0.25, 3.0, 0.75, -3.0]])
    prompt, output = [1, 2, 2], [2, 3, 3, 3, 5]
    r, f, pres, T = 1.3, 0.4, 0.25, 0.7
    p = SamplingParams(temperature=T, repetition_penalty=r, frequency_penalty=f,
                       presence_penalty=pres)
    raw, z = process_logits(x, _batch(p, [8], prompt_ids=[prompt], output_ids=[output]))
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    want = []
    for v in range(8):
        e = x[0, v]
        if v in prompt + output:  # repetition: prompt and output
            e = e / f32(r) if e > 0 else e * f32(r)
        c = output.count(v)  # frequency / presence: output only
        e = e - f32(f) * f32(float(c))
        e = e - f32(pres) * f32(float(c > 0))
        want.append(e / f32(T))
    assert torch.equal(raw, x) and torch.equal(z[0], torch.stack(want))
    assert not torch.equal(z, x / T)  # the penalties did something


def test_token_logprobs_equal_the_samplers_bitwise():
    gen = torch.Generator().manual_seed(3)
    specs = _specs()
    V = 37
    logits = torch.randn(len(specs), V, generator=gen) * 3
    out, b = _run(specs, logits, "cpu")
    # Raw rows: a prefill-like tensor with the rows at other indices, no sampling state.
    raw_rows = [i for i, s in enumerate(specs) if s[0].logprobs_mode == "raw"]
    pre = torch.randn(11, V, generator=gen)
    at = [10 - 2 * j for j in range(len(raw_rows))]
    toks = torch.randint(V, (11,), generator=gen)
    for i, a in zip(raw_rows, at):
        pre[a], toks[a] = logits[i], out.token_ids[i]
    lp = token_logprobs(pre, toks, num_top=20)
    for i, a in zip(raw_rows, at):
        assert torch.equal(lp.logprobs[a], out.logprobs[i])
        k = specs[i][0].logprobs or 0
        assert torch.equal(lp.top_ids[a, :k], out.top_ids[i, :k])
        assert torch.equal(lp.top_logprobs[a, :k], out.top_logprobs[i, :k])
    # With the batch: processed rows too, same bits.
    lp = token_logprobs(logits, out.token_ids, num_top=20, batch=b)
    assert torch.equal(lp.logprobs, out.logprobs) and torch.equal(lp.top_ids, out.top_ids)
    assert torch.equal(lp.top_logprobs, out.top_logprobs)


def test_logprob_modes_and_top_alternatives():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0, 5.0, -2.0]])
    raw = torch.ops.detcompile.softmax(logits, -1, False, True)
    for mode in ("raw", "processed"):
        p = SamplingParams(temperature=0.5, logprobs=4, logprobs_mode=mode)
        out = sample(logits, _batch(p, [0]))
        want = raw if mode == "raw" else torch.ops.detcompile.softmax(logits / 0.5, -1, False, True)
        assert torch.equal(out.logprobs, want[0, out.token_ids])
        assert out.top_ids[0].tolist() == [1, 2, 4, 3]  # descending, ties to the lowest index
        assert torch.equal(out.top_logprobs[0], want[0, [1, 2, 4, 3]])
    assert not torch.equal(raw, torch.ops.detcompile.softmax(logits / 0.5, -1, False, True))
    no_lp = sample(logits, _batch(SamplingParams(), [0]))
    assert no_lp.top_ids is None and no_lp.logprobs.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_path_has_no_host_sync():
    specs = _specs()
    logits = torch.randn(len(specs), 1000, device="cuda")
    b = SamplingBatch.from_params([s[0] for s in specs], [s[2] for s in specs],
                                  seeds=[s[1] for s in specs], prompt_ids=[s[3] for s in specs],
                                  output_ids=[s[4] for s in specs],
                                  banned_ids=[s[5] or [] for s in specs], device="cuda")
    sample(logits, b)  # warm-up (Triton compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batch_parameters_are_the_float32_and_int64_of_the_params():
    """SamplingBatch.from_params: each row's values, rounded once to float32; a -0.0 penalty becomes
    +0.0 (so a zero penalty is an exact no-op); top_k -1 means off (0)."""
    params = [SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, frequency_penalty=-0.0, presence_penalty=0.3,
                             repetition_penalty=1.1, top_k=-1),
              SamplingParams(temperature=0.0, top_k=5, logprobs_mode="processed")]
    b = SamplingBatch.from_params(params, [3, 9], seeds=[11, 2**62])
    f32 = lambda name: torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32)  # noqa: E731
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
        assert torch.equal(getattr(b, name), f32(name)), name
    assert b.frequency_penalty.tolist() == [0.0, 0.0] and math.copysign(1, b.frequency_penalty[0].item()) == 1
    assert b.top_k.tolist() == [0, 5] and b.seed.tolist() == [11, 2**62] and b.position.tolist() == [3, 9]
    assert b.processed_logprobs.tolist() == [False, True]
