"""One request's state inside the engine: its tokens, how many of them are in the KV cache, its
pages, its sampling parameters and what it has produced so far."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # not scheduled yet, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Tokens are ``prompt + output``; ``num_computed`` of them have their K/V in the cache.

    ``seed`` is the sample's own seed (``SamplingParams.sample_seed(i)`` for the i-th of n), so the
    noise of every token is a function of (seed, position) alone. ``score_only`` sequences compute
    logits for their prompt and stop (``Engine.score``)."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    request_id: str = ""
    sample_index: int = 0
    score_only: bool = False
    score_from: int = 0  # first position whose logprob a score_only sequence reports
    seq_id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at the last admission
    committed_pages: int = 0  # leading pages already offered to the prefix cache
    last_page_hash: int | None = None  # chained hash of the last of them
    status: Status = Status.WAITING
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # position -> (logprob of the prompt token there, its top alternatives); a dict, because a
    # preempted sequence recomputes positions it has already reported
    prompt_logprobs_by_pos: dict = field(default_factory=dict)
    text: str = ""
    stopped_by_string: bool = False
    num_preemptions: int = 0
    keep_logits: bool = False
    step_logits: list = field(default_factory=list)
    step_scores: list = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_at(self, pos: int) -> int:
        n = len(self.prompt)
        return self.prompt[pos] if pos < n else self.output[pos - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building ``tokens``."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        if start >= n:
            return self.output[start - n:end - n]
        return self.prompt[start:] + self.output[:end - n]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V is not in the cache yet (a prefill chunk, or the one decode token)."""
        return len(self) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and len(self.output) > 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.score_only or self.params.prompt_logprobs is not None

    @property
    def first_logit_pos(self) -> int:
        """The first position whose logits this sequence needs (a prefix before it may come from
        the prefix cache)."""
        if self.score_only:
            return max(self.score_from - 1, 0)
        if self.params.prompt_logprobs is not None:
            return 0
        return len(self) - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
