"""Where does an architecture's compile fail? Full tracebacks, and the same model under stock backends.

    python -m benchmarks.diagnose_compile --archs glm4_moe_lite,deepseek_v3 --dtypes float32,bfloat16 \
        --device cuda [--width W]

The sweep (``benchmarks/model_sweep.py``) records one line per failure. This runs the sweep's steps on
each (architecture, dtype) with nothing swallowed: the eager forward, then batch sizes 1, 3, 8 (the
dynamic-shape recompile happens at 3) under ``torch.compile`` with ``backend="eager"`` (Dynamo alone),
``"aot_eager"`` (Dynamo + AOTAutograd) and ``"deterministic"`` (strict). Each failure prints its whole
exception chain, Dynamo's explanation included. Which backends fail says where the fault is: all three,
Dynamo's own tracing (the model or torch on this device); only ``deterministic``, a detcompile pass or
kernel. A Dynamo "RuntimeError when making fake tensor call" names the FX node whose fake run raised.

Run it a second time with ``CUDA_LAUNCH_BLOCKING=1``: an asynchronous CUDA error left by an earlier kernel
surfaces at the next call that touches the device, which can be a fake-tensor call inside Dynamo; with
blocking launches it is raised by the kernel that caused it.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit runs (the CPU runs of the tests)

BACKENDS = ("eager", "aot_eager", "deterministic")
BATCH_SIZES = (1, 3, 8)


def describe(e: BaseException) -> str:
    """Every exception of the chain (cause, context, Dynamo's inner_exception), each with its message."""
    from benchmarks.model_sweep import _exception_chain

    return "\n--- caused by / during ---\n".join(f"{type(x).__module__}.{type(x).__name__}: {x}"
                                                 for x in _exception_chain(e))


def run_backend(model, ids_for, backend: str, log) -> str:
    """'ok', or the first line of the failure (the full chain goes to ``log``)."""
    import torch._dynamo

    torch._dynamo.reset()
    kwargs = {"options": {"strict": True}} if backend == "deterministic" else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    try:
        for bs in BATCH_SIZES:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = compiled(ids_for(bs))
                logits = out.logits if hasattr(out, "logits") else out[0]
                logits.float().sum().item()  # sync: a kernel fault is raised here, at its batch size
            log(f"    batch {bs}: ok")
        return "ok"
    except Exception as e:  # noqa: BLE001 - the point is to print it whole
        log(f"    batch {bs}: FAILED\n{traceback.format_exc()}\n  exception chain:\n{describe(e)}")
        return f"batch {bs}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        torch._dynamo.reset()


def diagnose(arch: str, dtype: str, device: str, width: int | None, log=print) -> dict[str, str]:
    from detcompile.models import tiny_causal_lm

    model = tiny_causal_lm(arch, dtype=getattr(torch, dtype), device=device, width=width)
    cfg = model.config
    log(f"== {arch} {dtype} width={width or 'tiny'} on {device}: "
        f"experts={getattr(cfg, '_experts_implementation', None)} attention={getattr(cfg, '_attn_implementation', None)}")
    vocab = min(getattr(cfg.get_text_config(), "vocab_size", 256) or 256, 256)
    g = torch.Generator().manual_seed(0)

    def ids_for(bs):
        return torch.randint(3, vocab, (bs, 12), generator=g).to(device)

    verdict = {}
    try:
        with torch.no_grad():
            model(ids_for(1))
        verdict["forward"] = "ok"
    except Exception as e:  # noqa: BLE001
        log(f"  eager forward FAILED:\n{traceback.format_exc()}")
        return {"forward": f"{type(e).__name__}: {e}"}
    for backend in BACKENDS:
        log(f"  backend={backend}")
        verdict[backend] = run_backend(model, ids_for, backend, log)
    log(f"  => {arch} {dtype}: " + "; ".join(f"{k} {v}" for k, v in verdict.items()))
    return verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diagnose_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="glm4_moe_lite,deepseek_v3")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=None)
    args = p.parse_args(argv)
    import transformers

    import detcompile  # noqa: F401

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING', '0')}, "
          + (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"))
    summary = []
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            v = diagnose(arch, dtype, args.device, args.width)
            summary.append(f"{arch} {dtype}: " + "; ".join(f"{k} {r}" for k, r in v.items()))
    print("\nSUMMARY\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
