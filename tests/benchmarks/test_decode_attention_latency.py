"""benchmarks/decode_attention_latency.py without a GPU: the line fit and the paged copy of K/V."""
import torch

from benchmarks import decode_attention_latency as dal


def test_fit_line():
    fixed, slope = dal.fit_line([1, 2, 4, 8], [5.0 + 2 * t for t in (1, 2, 4, 8)])
    assert abs(fixed - 5.0) < 1e-9 and abs(slope - 2.0) < 1e-9
    assert dal.fit_line([3, 3], [1.0, 2.0]) == (1.5, 0.0)


def test_paged_cache_reads_back_the_keys():
    n, page = 70, 16
    k, v = (torch.randn(1, dal.HKV, n, dal.D) for _ in range(2))
    kc, vc, bt = dal._paged(k, v, page)
    assert bt.shape == (1, 5) and sorted(bt[0].tolist()) == list(range(5))  # shuffled, every page once
    for src, cache in ((k, kc), (v, vc)):
        rows = cache[bt[0].long()].reshape(-1, dal.HKV, dal.D)[:n]  # logical order through the table
        assert torch.equal(rows.transpose(0, 1), src[0])
