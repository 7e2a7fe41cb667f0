"""model_runner.ModelRunner.layout: the host tensors of a step, checked against a plain per-row
construction on random decode and ragged batches (with and without CUDA-graph padding), with and
without a backend's extra inputs. Integer bookkeeping only, so equality is exact."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detcompile.engine.model_runner import ModelRunner
from detcompile.engine.sampling_params import SamplingParams
from detcompile.engine.scheduler import Work
from detcompile.engine.sequence import Sequence
from detcompile.kernels.paged_attention import varlen_tiles


def per_row_layout(runner, work, keep_rows, ragged, shapes, n_tiles=None):
    """The layout built row by row (how the engine first wrote it), into arrays of ``shapes``;
    ``n_tiles``: a CUDA graph's padded tile count."""
    bs = runner.block_size
    ids, pos, slots, keep, starts = [], [], [], [], []
    for w, rows in zip(work, keep_rows):
        first = len(ids)
        ids += w.seq.token_slice(w.start, w.end)
        p = np.arange(w.start, w.end)
        slots.append(np.asarray(w.seq.block_table, dtype=np.int64)[p // bs] * bs + p % bs)
        pos.append(p)
        keep += [first + r for r in rows]
        starts.append(first)
    n = len(work)
    n_rows = shapes["lens"][0]
    out = {k: np.zeros(shapes[k], np.int32 if k in ("table", "lens") else np.int64)
           for k in ("ids", "pos", "slots", "keep", "table", "lens")}
    out["keep"][:] = keep[-1] if keep else 0
    T = len(ids)
    out["ids"][:T], out["pos"][:T], out["slots"][:T] = ids, np.concatenate(pos), np.concatenate(slots)
    out["keep"][:len(keep)] = keep
    for row, w in enumerate(work):
        out["table"][row, :len(w.seq.block_table)] = w.seq.block_table
        out["lens"][row] = w.end
    out = {k: torch.from_numpy(v) for k, v in out.items()}
    if ragged:  # rows' first tokens and lengths, zero-padded to the rows; the kernel's tile list
        q_lens = [w.length for w in work]
        padded = lambda xs: torch.tensor(list(xs) + [0] * (n_rows - n), dtype=torch.int32)  # noqa: E731
        spare = None if n_tiles is None else n
        out.update(q_start=padded(starts), q_lens=padded(q_lens),
                   tiles=varlen_tiles(q_lens, runner.group, runner.block_m, n_tiles, spare))
    return out


def random_step(rng, ragged, bs, pool):
    work, keep_rows = [], []
    for _ in range(rng.randint(1, 40)):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 90))]
        seq = Sequence(prompt, SamplingParams(), 0)
        seq.output = [rng.randrange(1000) for _ in range(rng.randint(0, 30))]
        total = len(seq)
        length = rng.randint(1, min(total, 37)) if ragged else 1
        start = total - length if rng.random() < 0.7 else rng.randint(0, total - length)  # else a chunk
        end = start + length
        seq.block_table = rng.sample(pool, -(-end // bs))  # pages up to the chunk's end, as the scheduler grows them
        work.append(Work(seq, start, length))
        keep_rows.append(sorted(rng.sample(range(length), rng.randint(0, min(length, 3)))))
    return work, keep_rows


class Extra:  # a backend that adds a static input (as FA3 does)
    input_names = ("n_tokens",)

    def extra_inputs(self, host, ragged):
        return {"n_tokens": torch.tensor([host["ids"].shape[0], int(ragged)])}


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("backend", [None, Extra()])
def test_layout_equals_the_per_row_construction(ragged, graph, backend):
    rng = random.Random(f"{ragged}{graph}")
    bs = 16
    runner = SimpleNamespace(block_size=bs, max_pages=12, group=4, block_m=64, backend=backend)
    pool = list(range(1, 500))
    for _ in range(60):
        work, keep_rows = random_step(rng, ragged, bs, pool)
        sizes = None
        if graph:
            T = sum(w.length for w in work)
            n_tiles = varlen_tiles([w.length for w in work], 4, 64).shape[1] + 3
            sizes = (T + rng.randint(0, 9), len(work) + 1 + rng.randint(0, 5) if ragged else T + rng.randint(0, 9),
                     sum(map(len, keep_rows)) + rng.randint(1, 4), n_tiles)
            if not ragged:
                sizes = (sizes[0], sizes[0], sizes[2], 0)
        got = ModelRunner.layout(runner, work, keep_rows, ragged, sizes)
        T, n, kept = sum(w.length for w in work), len(work), sum(map(len, keep_rows))
        if sizes is None:  # unpadded: at least two tokens and two logits rows; pages up to the longest row
            expect = (max(T, 2), n if ragged else max(T, 2), max(kept, 2), max(-(-w.end // bs) for w in work))
        else:
            expect = (*sizes[:3], runner.max_pages)
        assert (got["ids"].shape[0], got["lens"].shape[0], got["keep"].shape[0], got["table"].shape[1]) == expect
        want = per_row_layout(runner, work, keep_rows, ragged, {k: tuple(v.shape) for k, v in got.items()},
                              None if sizes is None else sizes[3])
        if backend is not None:
            want.update(backend.extra_inputs(want, ragged))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_a_position_past_the_block_table_is_an_error():
    seq = Sequence(list(range(40)), SamplingParams(), 0)
    seq.block_table = [3, 4]  # 32 slots for 40 tokens
    runner = SimpleNamespace(block_size=16, max_pages=8, group=1, block_m=64, backend=None)
    with pytest.raises(IndexError):
        ModelRunner.layout(runner, [Work(seq, 39, 1)], [[0]], False)
