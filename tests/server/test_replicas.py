"""Scale-out: two server processes with the same fingerprint give the same bits for the same
requests (what lets replicas sit behind a load balancer)."""
from __future__ import annotations

from ._deps import require

require()  # skip without the serve extra, before importing it

import torch

from detcompile.server.fingerprint import tensor_digest

REQUESTS = [
    ("/generate", {"text": ["The sea", "A quiet town,", "The sea"], "return_logprob": True, "top_logprobs_num": 2,
                   "logprob_start_len": 0, "sampling_params": {"temperature": 0.9, "max_new_tokens": 10,
                                                               "sampling_seed": 5}}),
    ("/generate", {"input_ids": [1, 50, 60, 70], "sampling_params": {"n": 3, "temperature": 1.2,
                                                                     "max_new_tokens": 8}}),
    ("/v1/completions", {"model": "detcompile-tiny", "prompt": "Once", "max_tokens": 8, "seed": 9, "logprobs": 3}),
    ("/v1/chat/completions", {"model": "detcompile-tiny", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 8, "seed": 4, "logprobs": True, "top_logprobs": 2}),
]


def _strip(obj):
    """The response without what legitimately differs between calls (ids, timings)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("id", "e2e_latency", "created", "cached_tokens")}
    if isinstance(obj, list):
        return [_strip(x) for x in obj]
    return obj


def test_two_replicas_same_fingerprint_same_bits(server, replica):
    with server.client() as a, replica.client() as b:
        fa = a.get("/get_model_info").json()["system_fingerprint"]
        fb = b.get("/get_model_info").json()["system_fingerprint"]
        assert fa == fb
        for path, body in REQUESTS:
            ra, rb = a.post(path, json=body), b.post(path, json=body)
            assert ra.status_code == rb.status_code == 200
            assert ra.headers["x-detcompile-fingerprint"] == rb.headers["x-detcompile-fingerprint"] == fa
            assert _strip(ra.json()) == _strip(rb.json()), path


def test_weight_digest_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g)
    d = tensor_digest(w)
    assert d == tensor_digest(w.clone()) and len(d) == 32
    w2 = w.clone()
    w2.view(torch.int32)[123] ^= 1  # one bit
    assert tensor_digest(w2) != d
    assert tensor_digest(w.to(torch.bfloat16)) != tensor_digest(w.to(torch.float16))
    assert tensor_digest(w[:500]) != d


def test_config_and_tokenizer_digests(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from detcompile.models import tiny_model, tiny_tokenizer
    from detcompile.server.fingerprint import config_digest, tokenizer_digest, weights_digest

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    # A checkpoint written and read back is the same model, whatever its path.
    assert weights_digest(again) == weights_digest(model) and config_digest(again) == config_digest(model)
    assert tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_digest(tok)
    again.config.rope_theta = 1234.0  # same weights, different model
    assert config_digest(again) != config_digest(model)
    tok.chat_template = "{{ messages }}"
    assert tokenizer_digest(tok) != tokenizer_digest(tiny_tokenizer())
