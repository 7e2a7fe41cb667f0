"""benchmarks/attention_asm.py without a GPU: reading compiled variants out of a kernel's cache and
counting what matters in their PTX / TTGIR."""
import types

from benchmarks import attention_asm


def test_compiled_kernels_and_describe():
    fn = types.SimpleNamespace(arg_names=["Q", "PAGED", "BLOCK_N"])
    k = types.SimpleNamespace(
        asm={"ptx": "cp.async.cg.shared.global x; cp.async.cg.shared.global y; ld.global.b32 z; cp.async.bulk.w",
             "ttgir": "ttg.async_copy_global_to_local a"},
        src=types.SimpleNamespace(fn=fn, constants={(1,): True, (2,): 32}),
        n_regs=168, n_spills=0, metadata=types.SimpleNamespace(shared=49152))
    jit = types.SimpleNamespace(device_caches={0: ({"key": k}, {}, None, None, None)})
    assert attention_asm.compiled_kernels(jit) == [k]
    d = attention_asm.describe(k)
    assert d["constexprs"] == {"BLOCK_N": 32}
    assert (d["cp_async"], d["cp_async_bulk"], d["ld_global"], d["ttgir_async_copies"]) == (2, 1, 1, 1)
    assert (d["n_regs"], d["n_spills"], d["shared_bytes"]) == (168, 0, 49152)
