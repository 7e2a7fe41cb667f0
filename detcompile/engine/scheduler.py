"""Continuous batching: which sequences run in the next step, and with how many tokens.

Each step is one forward over a flat batch: every running sequence that is decoding contributes
its one new token, then prefills (resumed chunks first, then newly admitted sequences) fill the
rest of the token budget in chunks. Sequences join and leave at every step. When the KV cache
runs out, the newest running sequence is preempted: its pages are freed and it waits to be
recomputed later (same bits, since a token's K/V depends only on the tokens before it)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Work:
    """``seq`` computes tokens ``start .. start + length - 1`` in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, whose logits choose the next token."""
        return self.end == len(self.seq) and not self.seq.score_only


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[Work]:
        """The next step's work: one-token rows first (the attention op batches them), then chunks."""
        budget = self.max_num_batched_tokens
        singles: list[Work] = []
        chunks: list[Work] = []
        # 1. Running sequences, oldest first; make room by preempting the newest.
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            length = min(seq.num_pending, budget)
            while self.blocks.extra_blocks(seq, seq.num_computed + length) > self.blocks.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, seq.num_computed + length)
            (singles if length == 1 else chunks).append(Work(seq, seq.num_computed, length))
            budget -= length
        # 2. Admit waiting sequences while there is budget, room in the batch and KV space.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.admit(seq)
            length = min(seq.num_pending, budget)
            if self.blocks.extra_blocks(seq, seq.num_computed + length) > self.blocks.num_free:
                self.blocks.release(seq)
                if not self.running and not singles and not chunks:
                    raise RuntimeError(
                        f"the KV cache ({self.blocks.num_blocks - 1} pages of {self.blocks.block_size} tokens) "
                        f"cannot hold even the first chunk of a {len(seq)}-token sequence: give it more memory "
                        "(kv_cache_fraction / kv_cache_bytes) or lower chunked_prefill_size"
                    )
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_computed + length)
            seq.status = Status.RUNNING
            self.running.append(seq)
            (singles if length == 1 else chunks).append(Work(seq, seq.num_computed, length))
            budget -= length
        return singles + chunks

    def postprocess(self, work: list[Work]) -> None:
        """Advance the computed counts and register newly full pages in the prefix cache."""
        for w in work:
            w.seq.num_computed = w.end
            self.blocks.commit(w.seq)
