"""The engine's attention backends on the CPU (issue #14): option checks, the errors for a missing
package or an unsupported device or model, the host-side metadata builders (exact arrays), and the
engine's plumbing (a stand-in backend that computes with the Triton kernels must give the default
engine's bits and see consistent metadata). The backends themselves run in test_backends_gpu.py."""
from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch

from detcompile.engine import SamplingParams, attention_backends
from detcompile.kernels import _attention_backends as common
from detcompile.kernels import attention_fa3, attention_flashinfer
from detcompile.kernels.attention_fa3 import cu_seqlens_q, fa3_tile, pinned_max_seqlen_q
from detcompile.kernels.attention_flashinfer import decode_route_metadata

from ._util import fingerprint, make_engine, prompts

I32 = torch.int32


def t(*values):
    return torch.tensor(values, dtype=I32)


# -- options ----------------------------------------------------------------------------------------


def test_unknown_backend_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"attention_backend must be one of \['triton', 'fa3', 'flashinfer'\]"):
        make_engine(attention_backend="flash")


def test_importing_detcompile_imports_no_backend_package():
    import subprocess

    code = ("import sys, detcompile, detcompile.engine, detcompile.kernels.attention_fa3, "
            "detcompile.kernels.attention_flashinfer; "
            "print([m for m in ('fa3_fwd', 'fa3_fwd_interface', 'flashinfer') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name, package", [("fa3", ("fa3_fwd_interface", "fa3_fwd_config")),
                                           ("flashinfer", ("flashinfer", "flashinfer.decode"))])
def test_missing_package_says_how_to_install(monkeypatch, name, package):
    for mod in package:
        monkeypatch.setitem(sys.modules, mod, None)  # import of it fails
    with pytest.raises(ImportError, match=rf"pip install 'detcompile\[{name}\]'") as info:
        make_engine(attention_backend=name)
    assert isinstance(info.value, common.BackendUnavailableError)


def _fake_fa3(monkeypatch, calls=None, **flags):
    interface = types.ModuleType("fa3_fwd_interface")
    interface.flash_attn_with_kvcache = lambda *a, **k: (calls.append(k) if calls is not None else None)
    config = types.ModuleType("fa3_fwd_config")
    config.CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_FP16": True, "FLASHATTENTION_DISABLE_LOCAL": True,
                                     "FLASHATTENTION_DISABLE_PAGEDKV": True, **flags}}
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", interface)
    monkeypatch.setitem(sys.modules, "fa3_fwd_config", config)


def _fake_flashinfer(monkeypatch, wrapper_cls=object):
    pkg, decode = types.ModuleType("flashinfer"), types.ModuleType("flashinfer.decode")
    decode.BatchDecodeWithPagedKVCacheWrapper = wrapper_cls
    pkg.decode = decode
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.decode", decode)


@pytest.mark.parametrize("name", ["fa3", "flashinfer"])
def test_cpu_is_refused_naming_why(monkeypatch, name):
    _fake_fa3(monkeypatch)
    _fake_flashinfer(monkeypatch)
    with pytest.raises(common.BackendUnavailableError, match=rf"attention_backend='{name}' needs a CUDA GPU"):
        make_engine(attention_backend=name)


def _geometry(**kw):
    g = dict(device=torch.device("cuda"), dtype=torch.bfloat16, num_heads=8, num_kv_heads=2, head_dim=128,
             block_size=128, max_model_len=1024)
    g.update(kw)
    return g


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the compute capability the test sets (nothing runs on it)."""
    cc = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return cc


def test_fa3_refuses_gpus_other_than_hopper(monkeypatch, fake_gpu):
    _fake_fa3(monkeypatch)
    for cc in ((8, 0), (10, 0)):
        fake_gpu["value"] = cc
        with pytest.raises(common.BackendUnavailableError, match=rf"Fake GPU \(compute capability {cc[0]}.0\).*sm90"):
            attention_backends.create("fa3", **_geometry(), max_pages=8)


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float16), "runs torch.bfloat16 only"),
    (dict(dtype=torch.float32), "runs torch.bfloat16 only"),
    (dict(head_dim=320), "head dims <= 256"),
    (dict(block_size=16), r"block_size to be a multiple of 128 at head dim 128.*block_size=16"),
    (dict(head_dim=96, block_size=128), "multiple of 144"),
])
def test_fa3_refuses_what_it_cannot_run(monkeypatch, fake_gpu, change, message):
    _fake_fa3(monkeypatch)
    with pytest.raises(common.BackendUnavailableError, match=message):
        attention_backends.create("fa3", **_geometry(**change), max_pages=8)


def test_fa3_pins_every_call(monkeypatch, fake_gpu):
    calls = []
    _fake_fa3(monkeypatch, calls)
    be = attention_backends.create("fa3", **_geometry(max_model_len=1024), max_pages=8)
    ctx = types.SimpleNamespace(kv_lens=t(5, 0), block_table=torch.zeros((2, 8), dtype=I32),
                                extra={"cu_seqlens_q": t(0, 1, 2)})
    q = torch.zeros(2, 8, 128)
    be.attend(q, q, q, ctx, 0.125, 0.0, 0, None)
    (kw,) = calls
    assert kw["num_splits"] == 1 and kw["causal"] is True and kw["pack_gqa"] is True
    assert kw["max_seqlen_q"] == 1024  # the engine's constant, not the step's longest row (1 here)
    assert kw["cu_seqlens_q"] is ctx.extra["cu_seqlens_q"] and kw["page_table"] is ctx.block_table
    be.attend(q, q, q, ctx, 0.125, 0.0, 4096, None)  # a window no query can exceed is no window
    with pytest.raises(common.BackendUnavailableError, match="sliding window"):
        be.attend(q, q, q, ctx, 0.125, 0.0, 512, None)
    with pytest.raises(common.BackendUnavailableError, match="attention sinks"):
        be.attend(q, q, q, ctx, 0.125, 0.0, 0, torch.zeros(8))


def test_flashinfer_refuses_what_it_cannot_run(monkeypatch, fake_gpu):
    _fake_flashinfer(monkeypatch)
    fake_gpu["value"] = (7, 5)
    with pytest.raises(common.BackendUnavailableError, match="compute capability 7.5"):
        attention_backends.create("flashinfer", **_geometry(), max_pages=8)
    fake_gpu["value"] = (9, 0)
    with pytest.raises(common.BackendUnavailableError, match="float16 and bfloat16"):
        attention_backends.create("flashinfer", **_geometry(dtype=torch.float32), max_pages=8)
    with pytest.raises(common.BackendUnavailableError, match=r"head dims \(64, 128, 256\)"):
        attention_backends.create("flashinfer", **_geometry(head_dim=80), max_pages=8)


def test_default_block_size_per_backend():
    assert attention_backends.default_block_size("triton", 128) == 16
    assert attention_backends.default_block_size("flashinfer", 128) == 16
    assert [attention_backends.default_block_size("fa3", d) for d in (64, 96, 128, 192, 256)] == [128, 144, 128, 112, 80]


def test_compile_backend_option():
    from detcompile.backend import Options

    assert Options.from_user(None, {"attention_backend": "triton"}).attention_backend == "triton"
    for name, package in (("fa3", "fa3_fwd_interface"), ("flashinfer", "flashinfer")):
        try:
            __import__(package)
        except ImportError:  # not installed: refused when compiling, naming the extra
            with pytest.raises(ImportError, match=rf"pip install 'detcompile\[{name}\]'"):
                Options.from_user(None, {"attention_backend": name})
        else:
            assert Options.from_user(None, {"attention_backend": name}).attention_backend == name
    with pytest.raises(ValueError, match="unknown attention_backend"):
        Options.from_user(None, {"attention_backend": "xformers"})


def test_server_flag():
    from detcompile.server.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--attention-backend", "fa3"])
    assert args.attention_backend == "fa3" and args.block_size is None
    assert parser.parse_args(["serve"]).attention_backend == "triton"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--attention-backend", "xformers"])


# -- host-side metadata (exact arrays, worked out by hand) --------------------------------------------


def test_fa3_facts():
    assert [fa3_tile(d) for d in (64, 96, 128, 192, 256)] == [(192, 128), (192, 144), (128, 128), (128, 112),
                                                               (128, 80)]
    assert pinned_max_seqlen_q(1024, 4, 128) == 1024
    assert pinned_max_seqlen_q(64, 2, 192) == 97  # 97 * 2 > kBlockM: the TMA paged path
    assert pinned_max_seqlen_q(1, 1, 1) == 2  # never 1: that turns causal off


def test_fa3_cu_seqlens_q():
    # decode layout: row i is token i
    assert cu_seqlens_q(None, t(5, 9, 0), 3).tolist() == [0, 1, 2, 3]
    # ragged: rows of 3 and 1 queries, then a spare row that takes the 2 padding tokens
    assert cu_seqlens_q(t(3, 1, 0), t(5, 9, 0), 6).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_q(t(3, 1), t(5, 9), 4).tolist() == [0, 3, 4]
    with pytest.raises(ValueError, match="spare last row"):
        cu_seqlens_q(t(3, 1), t(5, 9), 6)
    with pytest.raises(ValueError, match="one token per row"):
        cu_seqlens_q(None, t(5, 9), 3)


def test_flashinfer_route_metadata_of_a_ragged_step():
    # page size 4. Row 0: 3 queries, the last of its 6 keys (positions 3, 4, 5); row 1: 1 query, key
    # count 2 (position 1); token 4 belongs to no row.
    table = torch.tensor([[7, 3, 9], [5, 0, 0]], dtype=I32)
    indptr, indices, last = decode_route_metadata(table, t(6, 2), t(0, 3), t(3, 1), 5, 4)
    # keys per token: 4, 5, 6, 2, padding (one key of page 0)
    assert indptr.tolist() == [0, 1, 3, 5, 6, 7]
    assert indices.tolist() == [7, 7, 3, 7, 3, 5, 0]
    assert last.tolist() == [4, 1, 2, 2, 1]
    assert indptr.dtype == indices.dtype == last.dtype == I32


def test_flashinfer_route_metadata_of_a_decode_step():
    table = torch.tensor([[7, 3], [5, 0], [0, 0]], dtype=I32)
    indptr, indices, last = decode_route_metadata(table, t(5, 4, 0), None, None, 3, 4)
    assert indptr.tolist() == [0, 2, 3, 4]
    assert indices.tolist() == [7, 3, 5, 0]  # the row of no keys (graph padding) reads page 0
    assert last.tolist() == [1, 4, 1]


class _RecordingWrapper:
    made = []

    def __init__(self, workspace, layout, **kw):
        self.kw, self.plans, self.runs = kw, [], 0
        _RecordingWrapper.made.append(self)

    def plan(self, indptr, indices, last, *args, **kw):
        self.plans.append((indptr.clone(), kw))

    def run(self, q, caches):
        self.runs += 1
        return torch.zeros_like(q)


def test_flashinfer_plans_per_step_and_per_graph(monkeypatch, fake_gpu):
    _RecordingWrapper.made = []
    _fake_flashinfer(monkeypatch, _RecordingWrapper)
    monkeypatch.setattr(attention_flashinfer, "require_cuda", lambda *a, **k: None)
    be = attention_backends.create("flashinfer", **_geometry(device=torch.device("cpu"), block_size=4,
                                                             max_model_len=64), max_pages=16)
    host = dict(ids=torch.zeros(5), table=torch.tensor([[7, 3, 9], [5, 0, 0]], dtype=I32), lens=t(6, 2),
                q_start=t(0, 3), q_lens=t(3, 1))
    step = be.plan(host, True)
    assert step.wrappers == {} and not _RecordingWrapper.made  # parameters unknown until a layer runs
    ctx = types.SimpleNamespace(plan=step)
    q = torch.zeros(5, 8, 128)
    for _ in range(2):  # two layers of the same parameters: one plan, two runs
        be.attend(q, q, q, ctx, 0.125, 0.0, 0, None)
    (eager,) = _RecordingWrapper.made
    assert eager.kw == dict(use_tensor_cores=True, backend="fa2") and eager.runs == 2 and len(eager.plans) == 1
    indptr, kw = eager.plans[0]
    assert indptr.tolist() == [0, 1, 3, 5, 6, 7]
    assert kw["disable_split_kv"] is True and kw["window_left"] == -1 and kw["sm_scale"] == 0.125
    be.attend(q, q, q, ctx, 0.125, 0.0, 8, None)  # a sliding layer: its own wrapper, window_left = 8 - 1
    assert len(_RecordingWrapper.made) == 2 and _RecordingWrapper.made[1].plans[0][1]["window_left"] == 7
    # a CUDA graph: a fixed-buffer wrapper per known parameter set, planned before capture/replay
    graph_step = be.plan(host, True, key=("mixed", 5))
    assert len(graph_step.wrappers) == 2
    w = graph_step.wrappers[(0.125, -1, 0.0)]
    assert w.kw["use_cuda_graph"] is True and w.kw["paged_kv_indices_buffer"].shape == (5 * 16,)
    assert be.plan(host, True, key=("mixed", 5)).wrappers[(0.125, -1, 0.0)] is w  # same wrapper, re-planned
    with pytest.raises(common.BackendUnavailableError, match="attention sinks"):
        be.attend(q, q, q, ctx, 0.125, 0.0, 0, torch.zeros(8))


# -- the engine's plumbing --------------------------------------------------------------------------


class _TritonStandIn:
    """A backend that computes with the Triton kernels (so the default engine's bits) and checks
    that the metadata the real backends would get is consistent with the step's layout."""

    name = "stand-in"
    input_names = ("cu_seqlens_q",)

    def __init__(self, block_size):
        self.block_size, self.plans, self.attends = block_size, [], 0

    def describe(self):
        return "stand-in"

    def extra_inputs(self, host, ragged):
        return attention_fa3.FA3Attention.extra_inputs(self, host, ragged)

    def plan(self, host, ragged, key=None):
        meta = decode_route_metadata(host["table"], host["lens"], host.get("q_start") if ragged else None,
                                     host.get("q_lens") if ragged else None, host["ids"].shape[0], self.block_size)
        self.plans.append(key)
        return host, meta

    def attend(self, q, k_cache, v_cache, ctx, scale, softcap, window, sinks):
        self.attends += 1
        host, (indptr, indices, last) = ctx.plan
        cu = ctx.extra["cu_seqlens_q"].cpu()
        lens = host["lens"]
        if ctx.tiles is None:
            assert cu.tolist() == list(range(lens.shape[0] + 1))
            kv_of_token = lens.long()
        else:
            starts, n = host["q_start"], host["q_lens"]
            real = n > 0
            assert torch.equal(cu[:-1][real], starts[real]) and int(cu[-1]) == q.shape[0]
            kv_of_token = torch.zeros(q.shape[0], dtype=torch.long)
            for b in range(n.shape[0]):
                s, k = int(starts[b]), int(n[b])
                kv_of_token[s:s + k] = int(lens[b]) - k + 1 + torch.arange(k)
        pages = indptr[1:] - indptr[:-1]
        got_kv = (pages.long() - 1) * self.block_size + last.long()
        real_tok = kv_of_token > 0
        assert torch.equal(got_kv[real_tok], kv_of_token[real_tok])  # each token reads exactly its prefix
        if ctx.tiles is None:
            out = torch.ops.detcompile.paged_attention(q.unsqueeze(2), k_cache, v_cache, ctx.block_table, ctx.kv_lens,
                                                       scale, softcap, window, sinks)
            return out.squeeze(2)
        return torch.ops.detcompile.paged_attention_varlen(q, k_cache, v_cache, ctx.block_table, ctx.kv_lens,
                                                           ctx.q_start, ctx.q_lens, ctx.tiles, scale, softcap, window,
                                                           sinks)


def test_engine_routes_attention_through_the_backend(monkeypatch):
    made = []

    def create(name, **kw):
        made.append(_TritonStandIn(kw["block_size"]))
        return made[-1]

    rng = torch.Generator().manual_seed(3)
    reference = make_engine()
    monkeypatch.setattr(attention_backends, "create", create)
    routed = make_engine(attention_backend="fa3", block_size=4)  # any name: create() is the stand-in's
    (stand_in,) = made
    assert routed.runner.backend is stand_in and stand_in.attends > 0  # the warm-up ran through it
    ps = prompts(rng, [3, 17, 9, 30], routed.vocab_size)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_new_tokens=5, logprobs=1)
    routed.scheduler.max_num_batched_tokens = 16  # chunks next to decode rows: ragged steps
    reference.scheduler.max_num_batched_tokens = 16
    a = [fingerprint(o) for o in routed.generate(ps, params, use_tqdm=False)]
    assert a == [fingerprint(o) for o in reference.generate(ps, params, use_tqdm=False)]
    assert None in stand_in.plans and routed.runner.step_kinds["eager"] > 0
