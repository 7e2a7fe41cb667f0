"""Decode-shape matmul configs (GPU): which small-M launch config streams the weights fastest.

    python -m benchmarks.matmul_small_m [--ms 2,8,16] [--block-ks 64,128,256] [--out DIR]
    python -m benchmarks.matmul_small_m --mid [--mid-ms 32,64] [--mid-shapes q/o,down,k/v]
    python -m benchmarks.matmul_small_m --swiglu [--ms 1,2,16]

At M <= 16 a matmul is a weight read: the time is bytes / bandwidth. For each Llama-3-8B weight
(x @ W.t(), W [N, K] as nn.Linear holds it) and each M, every candidate config of the pointer
kernel (BLOCK_M 16, BLOCK_N, warps, stages, persistent or one program per tile; BLOCK_K stays the
dtype's, so the K reduction and the bits do not change) is timed under a CUDA graph against
``F.linear`` (cuBLAS), with enough weight copies cycled that L2 never holds them. Every config's
output must equal the default config's bit for bit; a config that differs is reported and never
chosen. Prints a table per M and writes ``matmul_small_m.json``: the evidence behind
``matmul.select_config`` for M <= 16.

``--block-ks`` also tries other BLOCK_K values (the question: does Triton chain the same k16 MMAs in
the same order whatever the chunk length, so that BLOCK_K could follow K without moving a bit?). Each
one is first checked for bits at every M of ``--bits-ms`` (the default config per M, TMA and wgmma
tiles included, only BLOCK_K changed); its small-M configs are timed only if every M gave the default
BLOCK_K's bits, over a smaller grid (``BK_CONFIGS``). ``UNROLL_CONFIGS`` keep the default BLOCK_K and
walk its chunks ``K_UNROLL`` at a time (the same dots in the same order: the bits cannot move; on the
H200, 2026-12-03, 16-32 stages deep at BLOCK_K 64 did not reach BLOCK_K 256's speed, unrolling is the
other way to fewer, wider loop iterations): each shape's best config at the default BLOCK_K is printed
beside the overall best. Every config is checked against ``K_UNROLL=1``'s bits. Last, ``linear_group``'s one-launch
tile (q+k+v, gate+up of one layer) over ``GROUP_CONFIGS``, against separate cuBLAS calls.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from detcompile.kernels import matmul as mm

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "qkv": (6144, 4096), "gate/up": (14336, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
CONFIGS = [dict(BLOCK_N=bn, num_warps=w, num_stages=s, PERSISTENT=p)
           for bn, w, s, p in itertools.product((16, 32, 64, 128), (2, 4), (4, 8, 12), (True, False))]
BK_CONFIGS = [dict(BLOCK_N=bn, num_warps=4, num_stages=s, PERSISTENT=p)
              for bn, s, p in itertools.product((16, 32, 64), (3, 6), (True, False))]
# The default BLOCK_K's chunks walked K_UNROLL at a time (matmul.k_reduction): the same dots on the
# same chunks in the same order, so the bits cannot move; fewer loop iterations and wider loads in
# flight, as BLOCK_K 256 had (the rule-keeping way to its speed). A stage holds K_UNROLL chunks.
UNROLL_CONFIGS = [dict(BLOCK_N=bn, num_warps=4, num_stages=s, PERSISTENT=p, K_UNROLL=u)
                  for bn, s, p, u in itertools.product((16, 32, 64), (2, 3, 4, 6), (True, False), (2, 4))]
#: ``--mid``: M = 17..64 (batched decode; select_config took the TMA kernel there until this sweep:
#: o at M = 64 0.77x cuBLAS on the H200, 2026-12-03). The pointer kernel with K_UNROLL and other row
#: tiles, and the TMA kernel at other N tiles / depths; bits checked against the default config.
MID_CONFIGS = ([dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=s, PERSISTENT=p, K_UNROLL=u, TMA=False)
                for bm, bn, s, p, u in itertools.product((16, 64), (32, 64), (4, 6), (True, False), (1, 4))]
               + [dict(BLOCK_M=64, BLOCK_N=bn, num_warps=4, num_stages=s, TMA=True)
                  for bn, s in itertools.product((32, 64), (4, 6, 8))])
#: The grouped projections of a Llama-3-8B layer at decode (kernels/linear_group.py: one launch).
GROUPS = {"q+k+v": ((4096, 4096), (1024, 4096), (1024, 4096)), "gate+up": ((14336, 4096), (14336, 4096))}
GROUP_CONFIGS = [dict(BLOCK_N=bn, num_warps=4, num_stages=s, K_UNROLL=u)
                 for bn, s, u in itertools.product((32, 64), (2, 3, 4, 6, 8), (1, 2, 4))]


def sweep_groups(dev, gen, ms) -> list:
    """linear_group's one-launch tile at decode: every config must give the default's bits."""
    from detcompile.kernels import linear_group as lg

    out = []
    for name, shapes in GROUPS.items():
        wbytes = sum(n * k * 2 for n, k in shapes)
        n_copies = max(1, -(-(256 << 20) // wbytes))
        sets = [[torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02 for n, k in shapes]
                for _ in range(n_copies)]
        for M in ms:
            x = torch.randn(M, shapes[0][1], device=dev, generator=gen, dtype=torch.bfloat16)
            ref = lg.triton_linear_group(x, sets[0], _config=dict(K_UNROLL=1))  # one chunk per iteration
            t_default = time_graph(lambda ws: lg.triton_linear_group(x, ws), sets)
            t_cublas = time_graph(lambda ws: [F.linear(x, w) for w in ws], sets)
            rows = []
            for cfg in GROUP_CONFIGS:
                try:
                    got = lg.triton_linear_group(x, sets[0], _config=cfg)
                    same = all(torch.equal(g, r) for g, r in zip(got, ref))
                    t = time_graph(lambda ws: lg.triton_linear_group(x, ws, _config=cfg), sets)
                except Exception as e:  # noqa: BLE001  (shared memory, registers)
                    rows.append(dict(cfg, error=str(e).splitlines()[0][:120]))
                    continue
                rows.append(dict(cfg, seconds=t, same_bits=same, gbps=wbytes / t / 1e9))
            ok = [r for r in rows if r.get("same_bits")]
            best = min(ok, key=lambda r: r["seconds"])
            out.append(dict(group=name, M=M, cublas_s=t_cublas, default_s=t_default, best=best,
                            differing_bits=sum(r.get("same_bits") is False for r in rows), configs=rows))
            print(f"{name:8s} M={M:3d}: cuBLAS (separate) {wbytes / t_cublas / 1e9:6.0f} GB/s, default "
                  f"{wbytes / t_default / 1e9:6.0f} GB/s ({t_default * 1e6:6.1f} us), best {best['gbps']:6.0f} GB/s "
                  f"({best['seconds'] * 1e6:6.1f} us) BN={best['BLOCK_N']} st={best['num_stages']} "
                  f"unroll={best['K_UNROLL']}; "
                  f"configs with other bits: {out[-1]['differing_bits']}", flush=True)
        del sets
        torch.cuda.empty_cache()
    return out


def sweep_swiglu(dev, gen, ms) -> list:
    """``--swiglu``: linear_swiglu's one-launch tile (Llama-3-8B's gate/up and the SwiGLU) over
    ``GROUP_CONFIGS``, against the two launches it replaces (linear_group, silu_mul) and cuBLAS; every
    config must give the unfused ops' bits."""
    from detcompile.kernels import linear_swiglu as ls

    os.environ[ls.ONE_LAUNCH_ENV] = "1"  # the kernel under test (off by default until its GPU tests pass)
    (n, k), _ = GROUPS["gate+up"]
    wbytes = 2 * n * k * 2
    sets = [[torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
            for _ in range(max(1, -(-(256 << 20) // wbytes)))]
    out = []
    for M in ms:
        x = torch.randn(M, k, device=dev, generator=gen, dtype=torch.bfloat16)

        def unfused(ws):
            return torch.ops.detcompile.silu_mul(*torch.ops.detcompile.linear_group(x, ws))

        ref = unfused(sets[0])
        t_unfused = time_graph(unfused, sets)
        t_default = time_graph(lambda ws: ls.triton_linear_swiglu(x, *ws), sets)
        t_cublas = time_graph(lambda ws: F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1]), sets)
        rows = []
        for cfg in GROUP_CONFIGS:
            try:
                same = torch.equal(ls.triton_linear_swiglu(x, *sets[0], _config=cfg), ref)
                t = time_graph(lambda ws: ls.triton_linear_swiglu(x, *ws, _config=cfg), sets)
            except Exception as e:  # noqa: BLE001  (shared memory, registers)
                rows.append(dict(cfg, error=str(e).splitlines()[0][:120]))
                continue
            rows.append(dict(cfg, seconds=t, same_bits=same, gbps=wbytes / t / 1e9))
        ok = [r for r in rows if r.get("same_bits")]
        best = min(ok, key=lambda r: r["seconds"]) if ok else None
        out.append(dict(M=M, unfused_s=t_unfused, default_s=t_default, cublas_s=t_cublas, best=best,
                        default_same_bits=torch.equal(ls.triton_linear_swiglu(x, *sets[0]), ref),
                        differing_bits=sum(r.get("same_bits") is False for r in rows), configs=rows))
        print(f"swiglu M={M:3d}: unfused {t_unfused * 1e6:6.1f} us, fused default {t_default * 1e6:6.1f} us "
              f"(bits {'same' if out[-1]['default_same_bits'] else 'OTHER'}), cuBLAS + eager {t_cublas * 1e6:6.1f} us"
              + (f", best {best['seconds'] * 1e6:6.1f} us BN={best['BLOCK_N']} st={best['num_stages']} "
                 f"unroll={best['K_UNROLL']}" if best else ", no config with the same bits")
              + f"; configs with other bits: {out[-1]['differing_bits']}", flush=True)
    return out


def sweep_mid(dev, gen, ms, shapes) -> list:
    """``MID_CONFIGS`` per weight shape and M (17..64): time against cuBLAS and the default config;
    a config whose output differs from the default's in any bit is reported and never best."""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = []
    for name in shapes:
        N, K = SHAPES[name]
        wbytes = N * K * 2
        n_copies = max(1, -(-(256 << 20) // wbytes))
        ws = [torch.randn(N, K, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(n_copies)]
        for M in ms:
            x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.bfloat16)
            ref = mm.triton_matmul(x, ws[0].t())
            default = mm.select_config(M, N, torch.bfloat16, sms)
            t_cublas = time_graph(lambda w: F.linear(x, w), ws)
            t_default = time_graph(lambda w: mm.triton_matmul(x, w.t()), ws)
            rows = []
            for cfg in MID_CONFIGS:
                try:
                    same = torch.equal(mm.triton_matmul(x, ws[0].t(), _config=cfg), ref)
                    t = time_graph(lambda w: mm.triton_matmul(x, w.t(), _config=cfg), ws)
                except Exception as e:  # noqa: BLE001  (a config Triton cannot build)
                    rows.append(dict(cfg, error=str(e).splitlines()[0][:120]))
                    continue
                rows.append(dict(cfg, seconds=t, same_bits=same, gbps=wbytes / t / 1e9))
            ok = [r for r in rows if r.get("same_bits")]
            best = min(ok, key=lambda r: r["seconds"]) if ok else None
            bad = sum(r.get("same_bits") is False for r in rows)
            out.append(dict(shape=name, N=N, K=K, M=M, cublas_s=t_cublas, default_s=t_default,
                            default={k: default.get(k) for k in ("BLOCK_M", "BLOCK_N", "num_stages", "TMA")},
                            best=best, differing_bits=bad, configs=rows))
            desc = ("none gave the default's bits" if best is None else
                    f"best {best['seconds'] * 1e6:6.1f} us ({t_cublas / best['seconds']:.2f}x cuBLAS) "
                    f"BM={best['BLOCK_M']} BN={best['BLOCK_N']} st={best['num_stages']} TMA={best['TMA']} "
                    f"pers={best.get('PERSISTENT')} unroll={best.get('K_UNROLL', 1)}")
            print(f"mid {name:8s} M={M:3d}: cuBLAS {t_cublas * 1e6:6.1f} us, default {t_default * 1e6:6.1f} us "
                  f"({t_cublas / t_default:.2f}x), {desc}; configs with other bits: {bad}", flush=True)
        del ws
        torch.cuda.empty_cache()
    return out


def block_k_bits(dev, gen, block_k: int, ms) -> dict:
    """For each weight shape and M: does BLOCK_K = ``block_k`` give the default BLOCK_K's bits?"""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = {}
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
        for M in ms:
            x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.bfloat16)
            ref = mm.triton_matmul(x, w.t())
            cfg = dict(mm.select_config(M, N, torch.bfloat16, sms), BLOCK_K=block_k)
            try:
                out[f"{name} M={M}"] = bool(torch.equal(mm.triton_matmul(x, w.t(), _config=cfg), ref))
            except Exception as e:  # noqa: BLE001  (a tile Triton cannot build)
                out[f"{name} M={M}"] = f"error: {str(e).splitlines()[0][:100]}"
        del w
    return out


def time_graph(fn, copies, reps=5, calls=20) -> float:
    """Seconds per call: a CUDA graph of ``calls`` calls cycling through ``copies``."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for c in copies:
            fn(c)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(copies[i % len(copies)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="2,8,16")
    ap.add_argument("--block-ks", default=str(mm.BLOCK_K_16BIT), help="BLOCK_K values to try (bits first)")
    ap.add_argument("--bits-ms", default="1,2,16,64,256,4096")
    ap.add_argument("--mid", action="store_true", help="only the M = 17..64 study (MID_CONFIGS)")
    ap.add_argument("--swiglu", action="store_true", help="only linear_swiglu's tile at --ms (GROUP_CONFIGS)")
    ap.add_argument("--mid-ms", default="32,64")
    ap.add_argument("--mid-shapes", default="q/o,down,k/v", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if a.swiglu:
        with open(os.path.join(a.out, "matmul_swiglu.json"), "w") as f:
            json.dump(sweep_swiglu(dev, gen, [int(m) for m in a.ms.split(",")]), f, indent=1)
        return
    if a.mid:
        mid = sweep_mid(dev, gen, [int(m) for m in a.mid_ms.split(",")], a.mid_shapes.split(","))
        with open(os.path.join(a.out, "matmul_mid_m.json"), "w") as f:
            json.dump(mid, f, indent=1)
        return
    results, block_ks, bk_bits = [], [mm.BLOCK_K_16BIT], {}
    for bk in (int(v) for v in a.block_ks.split(",")):
        if bk == mm.BLOCK_K_16BIT:
            continue
        bk_bits[bk] = block_k_bits(dev, gen, bk, [int(m) for m in a.bits_ms.split(",")])
        same = all(v is True for v in bk_bits[bk].values())
        print(f"BLOCK_K {bk}: the default BLOCK_K's bits at every shape and M: {same}; "
              + ", ".join(f"{k}: {v}" for k, v in bk_bits[bk].items() if v is not True), flush=True)
        if same:
            block_ks.append(bk)
    grid = [dict(c, BLOCK_K=mm.BLOCK_K_16BIT) for c in CONFIGS + UNROLL_CONFIGS]
    grid += [dict(c, BLOCK_K=bk) for bk in block_ks[1:] for c in BK_CONFIGS]
    for name, (N, K) in SHAPES.items():
        wbytes = N * K * 2
        n_copies = max(1, -(-(256 << 20) // wbytes))
        ws = [torch.randn(N, K, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(n_copies)]
        for M in (int(m) for m in a.ms.split(",")):
            x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.bfloat16)
            ref = mm.triton_matmul(x, ws[0].t(), _config=dict(K_UNROLL=1))  # one chunk per loop iteration
            default = mm.select_config(M, N, torch.bfloat16, torch.cuda.get_device_properties(dev).multi_processor_count)
            t_cublas = time_graph(lambda w: F.linear(x, w), ws)
            t_default = time_graph(lambda w: mm.triton_matmul(x, w.t()), ws)
            rows = []
            for cfg in grid:
                c = dict(cfg, BLOCK_M=16, TMA=False)
                try:
                    out = mm.triton_matmul(x, ws[0].t(), _config=c)
                    same = torch.equal(out, ref)
                    t = time_graph(lambda w: mm.triton_matmul(x, w.t(), _config=c), ws)
                except Exception as e:  # a config Triton cannot build (registers, shared memory)
                    rows.append(dict(cfg, error=str(e).splitlines()[0][:120]))
                    continue
                rows.append(dict(cfg, seconds=t, same_bits=same, gbps=wbytes / t / 1e9))
            ok = [r for r in rows if r.get("same_bits")]
            best = min(ok, key=lambda r: r["seconds"])
            best64 = min((r for r in ok if r["BLOCK_K"] == mm.BLOCK_K_16BIT), key=lambda r: r["seconds"])
            bad = [r for r in rows if r.get("same_bits") is False]
            rec = dict(shape=name, N=N, K=K, M=M, cublas_s=t_cublas, default_s=t_default,
                       default={k: default[k] for k in ("BLOCK_N", "num_warps", "num_stages")},
                       best=best, best_default_block_k=best64, differing_bits=len(bad), configs=rows)
            results.append(rec)
            print(f"{name:8s} M={M:3d}: cuBLAS {wbytes / t_cublas / 1e9:6.0f} GB/s, default {wbytes / t_default / 1e9:6.0f} "
                  f"GB/s ({t_default * 1e6:6.1f} us), best {best['gbps']:6.0f} GB/s ({best['seconds'] * 1e6:6.1f} us) "
                  f"BN={best['BLOCK_N']} BK={best['BLOCK_K']} w={best['num_warps']} st={best['num_stages']} "
                  f"pers={best['PERSISTENT']} unroll={best.get('K_UNROLL', 1)}; at BK={mm.BLOCK_K_16BIT} "
                  f"{best64['gbps']:6.0f} GB/s (BN={best64['BLOCK_N']} st={best64['num_stages']} "
                  f"pers={best64['PERSISTENT']} unroll={best64.get('K_UNROLL', 1)}); "
                  f"configs with other bits: {len(bad)}", flush=True)
        del ws
        torch.cuda.empty_cache()
    groups = sweep_groups(dev, gen, [int(m) for m in a.ms.split(",")])
    with open(os.path.join(a.out, "matmul_small_m.json"), "w") as f:
        json.dump({"block_k_bits": {str(k): v for k, v in bk_bits.items()}, "results": results, "groups": groups},
                  f, indent=1)


if __name__ == "__main__":
    main()
