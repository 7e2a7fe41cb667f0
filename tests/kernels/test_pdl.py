"""Programmatic dependent launch (kernels/_pdl.py): on unless DETCOMPILE_PDL=0, CUDA on Hopper+ only, never in the
interpreter; with it on, the kernels give the bits they give without it (GPU)."""
import pytest
import torch

from detcompile.kernels import _pdl

from ._util import compile_for_sm90, needs_triton


def test_never_on_the_cpu(monkeypatch):
    for value in (None, "1", "0"):
        if value is None:
            monkeypatch.delenv(_pdl.ENV, raising=False)
        else:
            monkeypatch.setenv(_pdl.ENV, value)
        assert not _pdl.enabled(torch.empty(1))  # a CPU tensor (the interpreter's, too)
    assert _pdl.launch_kwargs(False) == {"PDL": False}
    assert _pdl.launch_kwargs(True) == {"PDL": True, "launch_pdl": True}


def test_prefetch_budget(monkeypatch):
    monkeypatch.delenv(_pdl.PREFETCH_ENV, raising=False)
    assert _pdl.row_prefetch_bytes(True, 8192, 4096, True) == 0  # no budget: no prefetch
    monkeypatch.setenv(_pdl.PREFETCH_ENV, "16")
    assert _pdl.launch_kwargs(True) == {"PDL": True, "launch_pdl": True}  # the launch itself does not change
    # 16 MB over 4096 rows of 8 KB: 4 KB each; over 1000 rows: the whole row; whole 16-byte units
    assert _pdl.row_prefetch_bytes(True, 8192, 4096, True) == 4096
    assert _pdl.row_prefetch_bytes(True, 8192, 1000, True) == 8192
    assert _pdl.row_prefetch_bytes(True, 100000, 3000, True) % 16 == 0
    assert _pdl.row_prefetch_bytes(False, 8192, 4096, True) == 0  # PDL off
    assert _pdl.row_prefetch_bytes(True, 8192, 4096, False) == 0  # rows not 16-byte aligned
    monkeypatch.setenv(_pdl.PREFETCH_ENV, "lots")
    with pytest.raises(ValueError, match=_pdl.PREFETCH_ENV):
        _pdl.prefetch_bytes()


_COMPILE_SCRIPT = r"""
from detcompile.kernels import linear_group as LG, matmul as MM

def ptx(fn, ptrs, extra, pdl, stages):
    const = dict(extra, PRECISION="ieee", IS_FP32=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, K_UNROLL=4, PDL=pdl)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: "*bf16" for n in ptrs})
    sig.update({n: "fp32" for n in ("alpha", "beta") if n in fn.arg_names})
    sig.update({n: "constexpr" for n in const})
    return triton.compile(source(fn, sig, const), target=TARGET, options={"num_warps": 4, "num_stages": stages}).asm["ptx"]

for fn, ptrs, extra in ((LG._linear_group_kernel, ("a_ptr", "w0", "w1", "w2", "c0", "c1", "c2"), {}),
                        (MM._matmul_kernel, ("a_ptr", "b_ptr", "x_ptr", "c_ptr"), dict(HAS_BIAS=False, GROUP_M=8))):
    p = ptx(fn, ptrs, extra, True, 3)
    prefetch, wait, trigger, load = (p.find(s) for s in ("cp.async.bulk.prefetch.L2", "griddepcontrol.wait",
                                                         "griddepcontrol.launch_dependents", "ld.global"))
    assert 0 <= prefetch < wait < trigger and wait < load, (fn.__name__, prefetch, wait, trigger, load)
    p = ptx(fn, ptrs, extra, False, 3)
    assert "griddepcontrol" not in p and "cp.async.bulk.prefetch" not in p
# The TMA kernel (M > 64): the wait comes before the first TMA load.
fn = MM._matmul_tma_kernel
for pdl in (False, True):
    const = dict(HAS_BIAS=False, B_KMAJOR=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, PDL=pdl)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({"a_desc": "tensordesc<bf16[64, 64]>", "b_desc": "tensordesc<bf16[32, 64]>",
                "c_desc": "tensordesc<bf16[64, 32]>", "x_ptr": "*bf16", "alpha": "fp32", "beta": "fp32"})
    sig.update({n: "constexpr" for n in const})
    p = triton.compile(source(fn, sig, const), target=TARGET, options={"num_warps": 4, "num_stages": 4}).asm["ptx"]
    first_tma = p.find("cp.async.bulk.tensor")
    assert first_tma >= 0
    assert (0 <= p.find("griddepcontrol.wait") < first_tma) if pdl else "griddepcontrol" not in p, pdl
print("COMPILED")
"""


@needs_triton
def test_triton_pdl_order_compiles_for_sm90():
    """With PDL the matmul kernels prefetch their weight rows (when given a budget), wait for the
    previous kernel before any load, then let the next one launch; without PDL they have no PDL
    instruction and no prefetch. The TMA matmul waits before its first TMA load."""
    compile_for_sm90(_COMPILE_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch_mb", ["0", "16"])
def test_gpu_pdl_kernels_give_the_same_bits_eager_and_in_a_graph(monkeypatch, gen, prefetch_mb):
    """The decode kernels launched with PDL, back to back (each reads the one before), eagerly and
    captured in a CUDA graph: the bits of plain launches."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs Hopper or newer")
    from detcompile.kernels.kv_cache_write import write_kv
    from detcompile.kernels.linear_group import triton_linear_group
    from detcompile.kernels.matmul import triton_matmul
    from detcompile.kernels.paged_attention import triton_paged_attention
    from detcompile.kernels.rms_norm import triton_rms_norm
    from detcompile.kernels.rotary_embedding import triton_rotary_embedding
    from detcompile.kernels.silu_mul import triton_silu_mul

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(2, 4096, generator=gen).to(dev, dt)
    wq, wk = (torch.randn(n, 4096, generator=gen).to(dev, dt) * 0.02 for n in (4096, 1024))
    wg, wu = (torch.randn(14336, 4096, generator=gen).to(dev, dt) * 0.02 for _ in range(2))
    wd = torch.randn(4096, 14336, generator=gen).to(dev, dt) * 0.02
    cos, sin = (torch.randn(1, 2, 128, generator=gen).to(dev, dt) for _ in range(2))
    kc, vc = (torch.zeros(64, 16, 8, 128, device=dev, dtype=dt) for _ in range(2))
    # Two decode rows over the same pages: row 0's new token goes to slot 0, row 1's to slot 1 (row 1
    # sees both). 64 pages of 16 in the table: 1024 keys, two splits, so the merge kernel runs too.
    slots = torch.tensor([0, 1], device=dev)
    table = torch.arange(64, device=dev, dtype=torch.int32).view(1, 64).expand(2, 64).contiguous()
    lens = torch.tensor([1, 2], device=dev, dtype=torch.int32)
    wn = torch.randn(4096, generator=gen).to(dev, dt)

    def chain():
        h = triton_rms_norm(x, wn, 1e-5)
        q, k = triton_linear_group(h, [wq, wk])
        q4, k4 = q.view(1, 2, 32, 128).transpose(1, 2), k.view(1, 2, 8, 128).transpose(1, 2)
        q4, k4 = triton_rotary_embedding([q4, k4], cos, sin)
        write_kv(kc, vc, slots, k4[0].transpose(0, 1), k4[0].transpose(0, 1))
        att = triton_paged_attention(q4[0].transpose(0, 1).unsqueeze(2), kc, vc, table, lens, _parallel_splits=True)
        g, u = triton_linear_group(x + att.reshape(2, 4096), [wg, wu])
        down = triton_matmul(triton_silu_mul(g, u), wd.t())
        wide = triton_matmul(down.repeat(64, 1), wq.t())  # M = 128: the TMA kernel
        return att, down, wide, kc.clone()

    monkeypatch.setenv(_pdl.ENV, "0")
    want = chain()
    monkeypatch.delenv(_pdl.ENV, raising=False)  # the default: on
    monkeypatch.setenv(_pdl.PREFETCH_ENV, prefetch_mb)  # and with weight prefetch before the wait
    assert _pdl.enabled(x)
    assert all(torch.equal(a, b) for a, b in zip(chain(), want))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = chain()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        kc.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, want))
