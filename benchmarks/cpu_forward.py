"""Compiled (``backend="deterministic"``) vs eager forward of a tiny Llama on the CPU.

    python -m benchmarks.cpu_forward [--batch 8] [--seq 64] [--layers 2] [--repeats 15]
                                     [--threads N] [--profile] [--json PATH]

The model is ``detcompile.models.tiny_model("llama")`` with the demo's sizes (hidden 128,
intermediate 344, 4 heads / 2 KV heads of 32, vocab 1024) and ``--layers`` layers, float32, seeded
random weights; the input is ``--batch`` x ``--seq`` random tokens. After one warm-up call each
(compilation), eager and compiled calls alternate, so a machine shared with other jobs slows both
alike; the figures are medians, and the ratio is compiled / eager. ``--profile`` prints the
torch.profiler table of one compiled call (ops by self CPU time). The script also checks that the
compiled logits of the batch's last row equal those of that row run alone (torch.equal); a
mismatch makes the exit status 1. ``--threads`` sets torch's thread count for both (on a machine
shared with other jobs, 1 thread avoids OpenMP threads spinning while their peers are descheduled,
which slows both ways by orders of magnitude and swamps the comparison).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build(layers: int):
    from detcompile.models import DEMO_CONFIG, tiny_model

    cfg = dict(DEMO_CONFIG, num_hidden_layers=layers)
    return tiny_model("llama", **cfg), cfg


def measure(batch: int = 8, seq: int = 64, layers: int = 2, repeats: int = 15, profile: bool = False) -> dict:
    import detcompile  # noqa: F401  (registers the backend)

    torch.manual_seed(0)
    model, cfg = build(layers)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic")
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(ids).logits
        first = time.perf_counter() - t0
        model(ids)  # eager warm-up (BLAS thread pool, allocator)
        eager_s, comp_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            eager_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            compiled(ids)
            comp_s.append(time.perf_counter() - t0)
        alone = compiled(ids[-1:]).logits[0]
        invariant = bool(torch.equal(out[-1], alone))
        table = None
        if profile:
            from torch.profiler import profile as prof

            with prof() as p:
                compiled(ids)
            table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    eager, comp = statistics.median(eager_s), statistics.median(comp_s)
    return {
        "batch": batch, "seq": seq, "layers": layers, "hidden": cfg["hidden_size"], "repeats": repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "first_call_s": first, "eager_s": eager, "compiled_s": comp, "ratio": comp / eager,
        "last_row_equals_alone": invariant, "profile": table,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.batch, args.seq, args.layers, args.repeats, args.profile)
    print(f"tiny llama, hidden {r['hidden']}, {r['layers']} layers, batch {r['batch']} x {r['seq']} tokens, "
          f"{r['threads']} threads, torch {r['torch']}")
    print(f"  first compiled call (compile included): {r['first_call_s']:.2f} s")
    print(f"  eager     {r['eager_s'] * 1e3:8.1f} ms (median of {r['repeats']})")
    print(f"  compiled  {r['compiled_s'] * 1e3:8.1f} ms  ({r['ratio']:.2f}x eager)")
    print(f"  last row bitwise equal to the row alone: {r['last_row_equals_alone']}")
    if r["profile"]:
        print(r["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r.items() if k != "profile"}, f, indent=2)
    return 0 if r["last_row_equals_alone"] else 1


if __name__ == "__main__":
    sys.exit(main())
