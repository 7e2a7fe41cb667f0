# TEMP stub until the sampler branch lands
from dataclasses import dataclass
@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    stop: object = None
    stop_token_ids: object = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    skip_special_tokens: bool = True
    def validate(self, vocab_size=None): pass
    @staticmethod
    def sample_seed_of(seed, i): return seed if i == 0 else hash((seed, i)) & (2**62-1)
