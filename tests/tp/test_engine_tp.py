"""Engine(..., tensor_parallel_size=N): one process per rank (gloo on the CPU), each engine given the
same requests, gives the tokens and logprobs of tensor_parallel_size=1, bit for bit; bad setups are
refused with a clear error."""
import os
import struct

import pytest
import torch

from ._util import run_ranks

CONFIG = dict(num_key_value_heads=4)  # 4 KV heads: up to TP = 4
ENGINE = dict(max_num_seqs=16, chunked_prefill_size=16, block_size=4, max_model_len=128, kv_cache_bytes=8 << 20,
              log=lambda msg: None)


def _run(tp):
    from detcompile.engine import Engine, SamplingParams
    from detcompile.models import tiny_model

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 256, (n,), generator=g).tolist() for n in (5, 23, 11)]  # 23: a chunked prefill
    params = [SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_new_tokens=6, logprobs=0),
              SamplingParams(temperature=1.2, seed=12, max_new_tokens=6, logprobs=0)]
    with Engine(tiny_model("llama", **CONFIG), tensor_parallel_size=tp, **ENGINE) as eng:
        outs = eng.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [struct.pack("<f", x) for x in o.outputs[0].logprobs]) for o in outs]


def _worker(rank, tp, out_dir):
    torch.save(_run(tp), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tokens_and_logprobs_same_bits_as_tp1(tmp_path, tp):
    run_ranks(_worker, tp, tp, str(tmp_path))
    want = _run(1)
    assert all(len(toks) == 6 and len(lps) == 6 for toks, lps in want)
    for rank in range(tp):
        assert torch.load(tmp_path / f"rank{rank}.pt") == want, rank


def test_refused_setups():
    from detcompile.engine import Engine
    from detcompile.models import tiny_model

    with pytest.raises(ValueError, match="one process per rank"):
        Engine(tiny_model("llama", **CONFIG), tensor_parallel_size=2, **ENGINE)  # no process group
    with pytest.raises(ValueError, match="deterministic=True"):
        Engine(tiny_model("llama", **CONFIG), tensor_parallel_size=1, deterministic=False, **ENGINE)
    with pytest.raises(ValueError, match="not a Llama-style"):
        Engine(tiny_model("gpt2"), tensor_parallel_size=1, **ENGINE)
    from detcompile.tp import shard_for_engine

    model = tiny_model("llama", **CONFIG)
    assert shard_for_engine(model, 1) == 0
    with pytest.raises(ValueError, match="already sharded"):
        shard_for_engine(model, 1)
    with pytest.raises(ValueError, match=">= 1"):
        shard_for_engine(tiny_model("llama"), 0)
