"""detcompile::kv_cache_write: a step's K/V into their cache slots, one launch for both."""
import pytest
import torch

from detcompile.kernels.kv_cache_write import eager_kv_cache_write, triton_kv_cache_write, write_kv

from ._util import LAUNCH_DEV, needs_triton

OP = torch.ops.detcompile.kv_cache_write


def caches(pages, page, hkv, d, dtype, device):
    return (torch.zeros(pages, page, hkv, d, dtype=dtype, device=device),
            torch.zeros(pages, page, hkv, d, dtype=dtype, device=device))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv,d", [(2, 16), (3, 24)])  # 3 x 24: masked head and column tails
def test_kernel_equals_index_copy(gen, dtype, hkv, d):
    T, pages, page = 7, 6, 4
    # k, v as the engine passes them: [1, Hkv, T, D] -> [T, Hkv, D] views (token stride D)
    k = torch.randn(1, hkv, T, d, generator=gen).to(dtype=dtype, device=LAUNCH_DEV)[0].transpose(0, 1)
    v = torch.randn(1, hkv, T, d, generator=gen).to(dtype=dtype, device=LAUNCH_DEV)[0].transpose(0, 1)
    slots = torch.randperm(pages * page, generator=gen)[:T].to(LAUNCH_DEV)
    kc, vc = caches(pages, page, hkv, d, dtype, LAUNCH_DEV)
    kc_ref, vc_ref = caches(pages, page, hkv, d, dtype, LAUNCH_DEV)
    triton_kv_cache_write(kc, vc, slots, k, v)
    eager_kv_cache_write(kc_ref, vc_ref, slots, k, v)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert kc.view(-1, hkv, d)[slots].equal(k) and vc.view(-1, hkv, d)[slots].equal(v)
    untouched = torch.ones(pages * page, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not kc.view(-1, hkv, d)[untouched.to(LAUNCH_DEV)].any()


def test_op_on_cpu_writes_int32_slots(gen):
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    kc, vc = caches(2, 4, 2, 8, torch.float32, "cpu")
    OP(kc, vc, torch.tensor([5, 0, 2], dtype=torch.int32), k, v)
    assert kc.view(-1, 2, 8)[[5, 0, 2]].equal(k) and vc.view(-1, 2, 8)[[5, 0, 2]].equal(v)


def test_bad_inputs_raise_and_write_nothing(gen):
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    kc, vc = caches(2, 4, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="slots"):
        write_kv(kc, vc, torch.tensor([1.0, 2.0, 3.0]), k, v)
    with pytest.raises(ValueError, match="does not hold"):
        write_kv(kc, vc, torch.arange(3), k.half(), v)
    with pytest.raises(ValueError, match="Hkv"):
        write_kv(kc, vc, torch.arange(3), k[:, :1], v)
    assert not kc.any() and not vc.any()


@pytest.mark.gpu
def test_gpu_llama_decode_and_prefill_shapes(gen):
    for T in (1, 2048):
        k = torch.randn(1, 8, T, 128, generator=gen).to("cuda", torch.bfloat16)[0].transpose(0, 1)
        v = torch.randn(1, 8, T, 128, generator=gen).to("cuda", torch.bfloat16)[0].transpose(0, 1)
        slots = torch.randperm(300 * 16, generator=gen)[:T].cuda()
        kc, vc = caches(300, 16, 8, 128, torch.bfloat16, "cuda")
        kc_ref, vc_ref = caches(300, 16, 8, 128, torch.bfloat16, "cuda")
        OP(kc, vc, slots, k, v)
        eager_kv_cache_write(kc_ref, vc_ref, slots, k, v)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
