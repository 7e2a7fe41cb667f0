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


def per_row_layout(runner, work, keep_rows, ragged, graph=None):
    """The layout built row by row (how the engine first wrote it)."""
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
    if graph is None:
        tokens, n_rows, n_keep = max(len(ids), 2), (n if ragged else max(len(ids), 2)), max(len(keep), 2)
        width = max(-(-w.end // bs) for w in work)
    else:
        tokens, n_rows, n_keep, n_tiles = graph
        width = runner.max_pages
    out = dict(ids=np.zeros(tokens, np.int64), pos=np.zeros(tokens, np.int64), slots=np.zeros(tokens, np.int64),
               keep=np.full(n_keep, keep[-1] if keep else 0, np.int64),
               table=np.zeros((n_rows, width), np.int32), lens=np.zeros(n_rows, np.int32))
    T = len(ids)
    out["ids"][:T], out["pos"][:T], out["slots"][:T] = ids, np.concatenate(pos), np.concatenate(slots)
    out["keep"][:len(keep)] = keep
    for row, w in enumerate(work):
        out["table"][row, :len(w.seq.block_table)] = w.seq.block_table
        out["lens"][row] = w.end
    out = {k: torch.from_numpy(v) for k, v in out.items()}
    if ragged:
        q_lens = [w.length for w in work]
        out["q_start"] = torch.zeros(n_rows, dtype=torch.int32)
        out["q_start"][:n] = torch.tensor(starts, dtype=torch.int32)
        out["q_lens"] = torch.zeros(n_rows, dtype=torch.int32)
        out["q_lens"][:n] = torch.tensor(q_lens, dtype=torch.int32)
        out["tiles"] = varlen_tiles(q_lens, runner.group, runner.block_m, None if graph is None else n_tiles,
                                    None if graph is None else n)
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
        want = per_row_layout(runner, work, keep_rows, ragged, sizes)
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
