"""SamplingParams: vLLM-style defaults, ValueErrors that name the field, derived seeds."""
import pytest

from detcompile.engine.sampling_params import DEFAULT_SEED, SamplingParams, mix64


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.max_new_tokens, p.min_new_tokens, p.stop, p.stop_token_ids) == (
        None, 16, 0, None, None)
    assert (p.ignore_eos, p.logprobs, p.prompt_logprobs, p.logprobs_mode,
            p.skip_special_tokens) == (False, None, None, "raw", True)
    assert DEFAULT_SEED == 42 and p.effective_seed == 42


BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "0.7"), ("temperature", None), ("top_p", 0.0), ("top_p", 1.01),
    ("top_p", -1), ("top_k", -2), ("top_k", 2.5), ("min_p", -0.01), ("min_p", 1.5),
    ("frequency_penalty", 2.5), ("frequency_penalty", float("nan")),
    ("presence_penalty", -2.01), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")), ("n", 0), ("n", 129), ("n", True), ("n", 2.0),
    ("max_new_tokens", 0), ("max_new_tokens", 10**6 + 1), ("min_new_tokens", -1),
    ("min_new_tokens", 17), ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", "7"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0), ("prompt_logprobs", 21),
    ("logprobs_mode", "logits"), ("stop", 5), ("stop", [""]), ("stop", ["a", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", 3), ("stop_token_ids", ["a"]),
    ("ignore_eos", "yes"), ("skip_special_tokens", 1),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_limits_are_stated():
    with pytest.raises(ValueError, match="128"):
        SamplingParams(n=500)
    with pytest.raises(ValueError, match="20"):
        SamplingParams(logprobs=50)


def test_vocab_dependent_checks():
    p = SamplingParams(top_k=100, stop_token_ids=[5, 99])
    assert p.validate(vocab_size=100) is p
    with pytest.raises(ValueError, match="top_k"):
        p.validate(vocab_size=50)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[100]).validate(vocab_size=100)
    # validate() re-checks a mutated dataclass
    p.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        p.validate()


def test_edge_values_accepted():
    SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, frequency_penalty=-2,
                   presence_penalty=2, repetition_penalty=0.01, n=128, seed=0,
                   max_new_tokens=10**6, min_new_tokens=10**6, logprobs=0, prompt_logprobs=20,
                   logprobs_mode="processed", stop="x", stop_token_ids=[0])
    SamplingParams(seed=2**63 - 1, stop=["a", "b"], logprobs=20)


def test_mix64_matches_splitmix64():
    # Published first outputs of splitmix64 seeded with 0 (state += golden; finalise).
    g = 0x9E3779B97F4A7C15
    assert mix64(g) == 0xE220A8397B1DCDAF
    assert mix64(2 * g) == 0x6E789E6AA1B965F4


def test_sample_seeds():
    p = SamplingParams(seed=7, n=8)
    seeds = [p.sample_seed(i) for i in range(128)]
    assert seeds[0] == 7  # n=1 equals the plain request
    assert len(set(seeds)) == 128 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [SamplingParams(seed=7).sample_seed(i) for i in range(128)]
    assert SamplingParams(seed=8).sample_seed(1) != p.sample_seed(1)
    assert SamplingParams().sample_seed(0) == DEFAULT_SEED
    assert SamplingParams(seed=p.sample_seed(3)).validate()  # a derived seed is a valid seed
    with pytest.raises(ValueError):
        p.sample_seed(-1)
