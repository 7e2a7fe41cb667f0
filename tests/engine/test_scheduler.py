"""Continuous batching: one-token rows first, chunks under the token budget, admission by room,
preemption of the newest sequence when pages run out."""
import pytest

from detcompile.engine.block_manager import BlockManager
from detcompile.engine.sampling_params import SamplingParams
from detcompile.engine.scheduler import Scheduler
from detcompile.engine.sequence import Sequence, Status


def seq(n, start=0):
    return Sequence(list(range(start, start + n)), SamplingParams(), 0)


def step(sched, work, sample=True):
    """What the engine does after a forward: advance, then append a token to sampling rows."""
    sched.postprocess(work)
    for w in work:
        if w.samples and sample:
            w.seq.output.append(7)


def test_prompt_is_chunked_under_the_budget_and_decodes_come_first():
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq(23)
    sched.add(a)
    lengths = []
    while not a.output:
        work = sched.schedule()
        lengths.append([w.length for w in work])
        step(sched, work)
    assert lengths == [[10], [10], [3]]
    b = seq(15, start=100)
    sched.add(b)
    work = sched.schedule()
    assert [(w.seq, w.length) for w in work] == [(a, 1), (b, 9)]  # a decodes, b fills the rest


def test_admission_respects_max_num_seqs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(5, start=10 * i))
    work = sched.schedule()
    assert len(work) == 2 and len(sched.waiting) == 1


def test_kv_exhaustion_preempts_the_newest_and_requeues_it_first():
    sched = Scheduler(BlockManager(7, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(11), seq(11, start=50)  # 3 pages each, 6 usable
    sched.add(a)
    sched.add(b)
    step(sched, sched.schedule())
    assert a.status is b.status is Status.RUNNING
    for _ in range(2):  # 12 tokens fit 3 pages each; at 13, a needs a 4th page: b (newest) goes
        step(sched, sched.schedule())
    assert sched.num_preemptions >= 1
    assert b.status is Status.WAITING and sched.waiting[0] is b and b.num_computed == 0 and not b.block_table
    assert len(b.output) >= 1  # generated tokens are kept: they are recomputed, not redrawn


def test_a_sequence_that_cannot_fit_raises_a_clear_error():
    sched = Scheduler(BlockManager(3, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(seq(20))
    with pytest.raises(RuntimeError, match="cannot hold even the first chunk"):
        sched.schedule()


def test_finish_and_abort_free_pages():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(9), seq(9, start=30)
    sched.add(a)
    sched.add(b)
    step(sched, sched.schedule())
    sched.finish(a)
    sched.abort(b)
    assert not sched.running and bm.num_free == 15
