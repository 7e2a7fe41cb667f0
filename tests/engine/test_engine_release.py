"""An engine's memory goes away with it: ``close()`` frees the KV cache, the CUDA graphs and the
compiled forward even while something still holds the engine or its runner (a benchmark's
``runner = eng.runner``); a closed engine refuses work with a clear error; the model is left as it
was, so engines built one after another on it give the same bits."""
import gc
import weakref

import pytest
import torch

from detcompile.engine import Engine, SamplingParams
from detcompile.engine import hf_generate
from detcompile.engine.model_runner import ModelRunner
from detcompile.models import tiny_model

from ._util import fingerprint, make_engine

PARAMS = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_new_tokens=4, logprobs=1)
SMALL = dict(max_num_seqs=4, chunked_prefill_size=32, block_size=4, max_model_len=64, kv_cache_bytes=4 << 20,
             log=lambda msg: None)


def _held(runner) -> list[weakref.ref]:
    """Weak references to what the runner allocated: each layer's K and V pages, the compiled forward
    (deterministic=False runs the model itself)."""
    compiled = [weakref.ref(runner.forward)] if runner.forward is not runner.model else []
    return [weakref.ref(t) for kv in runner.kv_caches for t in kv] + compiled


def _alive(refs) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


def test_close_frees_the_cache_while_the_runner_is_still_held():
    eng = make_engine()
    eng.generate([5, 6, 7], PARAMS, use_tqdm=False)
    runner = eng.runner  # what benchmarks/engine_profile.py held past `del eng`
    refs = _held(runner)
    eng.close()
    assert _alive(refs) == 0
    assert not runner.graphs and not runner.mixed_graphs
    eng.close()  # idempotent
    assert eng.closed


def test_deleting_the_engine_frees_the_cache():
    model = tiny_model("llama")  # outlives the engine: nothing on it may hold the engine
    eng = Engine(model, **SMALL)
    eng.generate([5, 6, 7], PARAMS, use_tqdm=False)
    refs = _held(eng.runner) + [weakref.ref(eng)]
    del eng
    assert _alive(refs) == 0


def test_closed_engine_raises_a_clear_error():
    with Engine(tiny_model("llama"), deterministic=False, **SMALL) as eng:
        eng.add_request([5, 6, 7], PARAMS)
    assert eng.closed  # the with block closed it (with a request unfinished)
    for call in (lambda: eng.step(), lambda: eng.generate([5, 6], PARAMS), lambda: eng.add_request([5, 6]),
                 lambda: eng.score([5, 6], [7]), lambda: eng.has_unfinished()):
        with pytest.raises(RuntimeError, match="Engine was closed"):
            call()


def test_engines_built_in_turn_on_one_model_give_the_same_bits():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = model(ids).logits
    attn = [m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is not None]
    ps = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    runs = []
    for _ in range(2):
        with Engine(model, **SMALL) as eng:
            runs.append([fingerprint(o) for o in eng.generate(ps, PARAMS, use_tqdm=False)])
    assert runs[0] == runs[1]
    # Nothing left patched on the model: its attention setting and its own forward's bits.
    assert [m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is not None] == attn
    assert "forward" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_engine_for_frees_the_old_engine_before_building_the_next(monkeypatch):
    # detcompile.generate keeps one engine on the model; asked for other options, it builds a new
    # one. The old one's cache must be gone when the new one sizes its own (on a GPU, by the free memory).
    model = tiny_model("llama")
    old = hf_generate.engine_for(model, deterministic=False, **SMALL)
    refs = _held(old.runner)
    alive_at_plan = []
    plan = ModelRunner._plan_cache

    def spy(self, *args):
        alive_at_plan.append(_alive(refs))
        return plan(self, *args)

    monkeypatch.setattr(ModelRunner, "_plan_cache", spy)
    new = hf_generate.engine_for(model, deterministic=False, **{**SMALL, "max_num_seqs": 8})
    assert alive_at_plan == [0] and old.closed and new is not old
    assert hf_generate.engine_for(model, deterministic=False, **{**SMALL, "max_num_seqs": 8}) is new
    new.close()
    assert hf_generate.engine_for(model, deterministic=False, **{**SMALL, "max_num_seqs": 8}) is not new


@pytest.mark.gpu
def test_close_returns_gpu_memory_with_cuda_graphs():
    # The GPU part: the CUDA graphs, their static buffers and memory pool go too, back to the driver
    # (the next engine sizes its cache by torch.cuda.mem_get_info, which counts reserved memory as taken).
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    eng = Engine(model, **{**SMALL, "max_num_seqs": 16, "kv_cache_bytes": 256 << 20})
    eng.generate([[5, 6, 7], [8, 9]], PARAMS, use_tqdm=False)
    runner = eng.runner
    assert runner.graphs and runner.mixed_graphs and torch.cuda.memory_allocated() - allocated >= 256 << 20
    eng.close()
    assert torch.cuda.memory_allocated() - allocated < 16 << 20
    assert torch.cuda.memory_reserved() - reserved < 64 << 20
