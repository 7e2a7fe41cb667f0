"""Per-request sampling parameters of the engine (field names and defaults as in vLLM / SGLang).

Every request is reproducible: a request without a seed uses ``DEFAULT_SEED`` (42, as the reference
system does), so two unseeded requests with the same prompt and parameters give the same tokens.
With ``n > 1`` the i-th sample uses ``sample_seed(i)``: sample 0 uses the seed itself (so ``n=1``
equals a plain request) and the others a hash of (seed, i), so the samples differ yet each can be
reproduced alone.

``logprobs_mode``: ``"raw"`` reports the fp32 log_softmax of the model's logits; ``"processed"``
the fp32 log_softmax of the logits after the penalties, banned tokens (``min_new_tokens``) and
temperature (not for greedy rows: temperature 0 divides by nothing), before the top-k / top-p /
min-p masks.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Union

#: Seed of a request that names none (the reference system uses 42).
DEFAULT_SEED = 42
MAX_N = 128
MAX_LOGPROBS = 20
MAX_NEW_TOKENS = 10**6
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SAMPLE_SALT = 0xD1B54A32D192ED03  # keeps derived seeds apart from the sampler's row keys


def mix64(z: int) -> int:
    """splitmix64's finaliser on Python ints mod 2**64 (``sampler.mix64`` is the tensor twin)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _is_int(v) -> bool:
    # numbers.* admits numpy scalars; bool is an int in Python but never a meant count.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # 0 or -1 = off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # None = DEFAULT_SEED
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; 0: the chosen token's; k: plus the top k
    prompt_logprobs: Optional[int] = None
    logprobs_mode: str = "raw"  # "raw" | "processed" (module docstring)
    skip_special_tokens: bool = True

    def __post_init__(self):
        self.validate()

    @property
    def effective_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    def sample_seed(self, i: int) -> int:
        """Seed of the i-th of the n samples: the seed itself for i = 0, else a hash of (seed, i)
        in [0, 2**63) (a valid seed, so a sample can be replayed as a plain request)."""
        if not _is_int(i) or i < 0:
            raise ValueError(f"sample index must be an int >= 0, got {i!r}")
        s = self.effective_seed
        if i == 0:
            return s
        return mix64(mix64(s ^ _SAMPLE_SALT) + i * _GOLDEN) >> 1

    def validate(self, vocab_size: Optional[int] = None) -> "SamplingParams":
        """Raise ValueError naming the first bad field; return self."""
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

        for f in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                  "repetition_penalty"):
            v = getattr(self, f)
            if not _is_num(v) or not math.isfinite(v):
                bad(f, "must be a finite number")
        for f in ("n", "top_k", "max_new_tokens", "min_new_tokens"):
            if not _is_int(getattr(self, f)):
                bad(f, "must be an int")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1 or (vocab_size is not None and self.top_k > vocab_size):
            bad("top_k", f"must be -1 or 0 (off) or in [1, vocab_size={vocab_size}]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for f in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, f) <= 2:
                bad(f, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be in [1, {MAX_N}] (at most {MAX_N} samples per request)")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            bad("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS}]")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be None or an int in [0, 2**63)")
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(f, f"must be None or an int in [0, {MAX_LOGPROBS}] (at most {MAX_LOGPROBS} "
                       "alternatives)")
        if self.logprobs_mode not in ("raw", "processed"):
            bad("logprobs_mode", "must be 'raw' or 'processed'")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (not isinstance(stops, (list, tuple))
                                  or not all(isinstance(s, str) and s for s in stops)):
            bad("stop", "must be None, a non-empty str or a list of them")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in ids)):
            bad("stop_token_ids", f"must be a list of token ids in [0, vocab_size={vocab_size})")
        for f in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be a bool")
        return self
