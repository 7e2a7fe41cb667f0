"""The fusions of issue #10 against the eager ops they replace: ``python -m benchmarks.fusion [--quick]``.

Llama-3-8B shapes in bf16 (32 query / 8 KV heads of 128, MLP width 14336), T tokens (decode: T = 1..2;
the engine pads a step to 2 tokens):

* ``rotary``: ``detcompile.rotary_embedding([q, k], cos, sin)`` (one launch) against transformers'
  ``apply_rotary_pos_emb(q, k, cos, sin)`` eagerly (mul, neg, cat, mul, add for q and for k);
* ``silu_mul``: ``detcompile.silu_mul(gate, up)`` against ``F.silu(gate) * up``.

Each number is the median time of one call inside a CUDA graph of many (``benchmarks.kernels.timing.GraphTimer``:
no Python or launch overhead, as in the engine's decode graphs). ``bitwise`` compares the two outputs bit
for bit; ``saved/token`` is (eager - fused) x 32 layers. Needs one CUDA GPU; about a minute.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.kernels.measures import same_bits
from benchmarks.kernels.tables import fmt_time, markdown_table
from benchmarks.kernels.timing import GraphTimer

LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 32, 32, 8, 128, 14336


def rotary_case(T: int, dtype=torch.bfloat16):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(1, T, HEADS, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(1, T, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2)
    ang = torch.rand(1, T, HEAD_DIM // 2, device="cuda") * T
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    def eager(q, k, c, s):
        return apply_rotary_pos_emb(q, k, c, s)

    def fused(q, k, c, s):  # what the pass makes of it: cos/sin unsqueezed on the head dim
        return torch.ops.detcompile.rotary_embedding([q, k], c.unsqueeze(1), s.unsqueeze(1))

    return eager, fused, (q, k, cos, sin)


def silu_mul_case(T: int, dtype=torch.bfloat16):
    g = torch.randn(T, MLP, device="cuda", dtype=dtype) * 3
    u = torch.randn(T, MLP, device="cuda", dtype=dtype)
    return (lambda g, u: F.silu(g) * u), (lambda g, u: torch.ops.detcompile.silu_mul(g, u)), (g, u)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="decode sizes only")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fusion needs a CUDA GPU")
    import detcompile  # noqa: F401  (registers the ops)

    tokens = (1, 2, 8) if a.quick else (1, 2, 8, 64, 512, 4096)
    timer = GraphTimer()
    rows = []
    for name, case in (("rotary (q+k)", rotary_case), ("silu_mul", silu_mul_case)):
        for T in tokens:
            eager, fused, args = case(T)
            same = all(same_bits(x, y) for x, y in zip(_flat(eager(*args)), _flat(fused(*args))))
            te, tf = timer(eager, *args).seconds, timer(fused, *args).seconds
            saved = (te - tf) * LAYERS if T <= 2 else None
            rows.append([name, T, fmt_time(te), fmt_time(tf), f"{te / tf:.2f}x", "yes" if same else "NO",
                         fmt_time(saved) if saved is not None else ""])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(markdown_table(["op", "tokens", "eager", "fused", "speedup", "bitwise", "saved/token (32 layers)"], rows))


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


if __name__ == "__main__":
    main()
