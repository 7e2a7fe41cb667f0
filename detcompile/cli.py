"""The ``detcompile`` command line: ``detcompile demo``, ``detcompile explain``, ``detcompile audit``, and
``detcompile serve`` / ``detcompile check-server`` (registered by ``detcompile.server.cli``)."""
from __future__ import annotations

import argparse
import difflib
import os
import sys


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cmd_demo(args) -> int:
    from .demo import format_demo, run_demo

    res = run_demo(
        device=args.device,
        dtype=args.dtype,
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        ways=tuple(args.ways.split(",")),
        progress=not args.no_progress,
    )
    print(format_demo(res))
    det = res["results"].get("deterministic")
    return 0 if det is None or (det["logits"] == 1 and det["tokens"] == 1) else 1


def _load_model(args):
    """The model a subcommand works on: a local checkpoint (--model) or a tiny --arch; and its device."""
    import torch

    from .models import tiny_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model:
        from transformers import AutoModelForCausalLM

        _check_model_dir(args.model)
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval(), device
    _check_arch(args.arch)
    return tiny_model(args.arch, dtype=dtype, device=device, attn_implementation=args.attn), device


def _check_model_dir(path: str) -> None:
    # from_pretrained would take a missing directory for a hub repo id and fail with a hub error.
    if not os.path.isdir(path):
        raise ValueError(f"--model {path}: no such directory (--model takes a local Hugging Face checkpoint "
                         "directory; detcompile downloads nothing)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path}: no config.json there, so it is not a Hugging Face checkpoint directory")


def _check_arch(arch: str) -> None:
    """An unknown --arch: suggest the closest model types instead of listing all of them."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # a transformers without this table: tiny_model reports it
        return
    if arch in CONFIG_MAPPING_NAMES:
        return
    close = difflib.get_close_matches(arch.lower().replace("-", "_"), list(CONFIG_MAPPING_NAMES), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. llama, mistral, qwen2, gpt2, mixtral"
    raise ValueError(f"unknown model architecture {arch!r} (a transformers model type): {hint}")


def _cmd_explain(args) -> int:
    import torch

    from .explainer import explain

    model, device = _load_model(args)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    result = explain(model, ids, options={"strict": False})
    return 0 if result.ok else 1


def _cmd_audit(args) -> int:
    import torch

    from .divergence import audit

    model, device = _load_model(args)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(args.seed)).to(device)
    target_row = int(args.target_row) if args.target_row.lstrip("-").isdigit() else args.target_row
    result = audit(
        model, ids, batch_sizes=args.batch_sizes, target_row=target_row, seed=args.seed, rewrite=not args.stock
    )
    if args.all and result.divergences:
        print("all divergent nodes, in graph order:")
        for d in result.divergences:
            print(f"  graph {d.graph} {d.node:<24} {d.op:<48} {'root    ' if d.is_root else 'inherits'}  {d.source}")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detcompile", description="Bitwise batch-invariant inference for Hugging Face models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run one prompt alone and in batches through eager, torch.compile and detcompile")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--batch-sizes", type=_ints, default=[1, 2, 3, 4, 8, 16], help="comma-separated, e.g. 1,3,8")
    d.add_argument("--prompt-len", type=int, default=24)
    d.add_argument("--new-tokens", type=int, default=8)
    d.add_argument("--ways", default="eager,torch.compile,deterministic",
                   help="comma-separated subset of eager,torch.compile,deterministic")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser("explain", help="print what the backend rewrites in a model, what it leaves and why")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--arch", default="llama", help="a transformers model type, built tiny with random weights")
    src.add_argument("--model", help="path to a local Hugging Face checkpoint directory")
    e.add_argument("--attn", default=None, help="attn_implementation for --arch (sdpa, eager)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--batch", type=int, default=2)
    e.add_argument("--seq-len", type=int, default=16)
    e.set_defaults(func=_cmd_explain)

    a = sub.add_parser(
        "audit",
        help="run one row alone and inside batches; find the first graph node whose bits for that row differ "
             "(exit 0: none, 1: found)",
    )
    src = a.add_mutually_exclusive_group()
    src.add_argument("--arch", default="llama", help="a transformers model type, built tiny with random weights")
    src.add_argument("--model", help="path to a local Hugging Face checkpoint directory")
    which = a.add_mutually_exclusive_group()
    which.add_argument("--stock", action="store_true", help="audit the stock aten graph (no detcompile pass)")
    which.add_argument("--rewritten", action="store_true",
                       help="audit the graph after detcompile's passes (the default)")
    a.add_argument("--attn", default=None, help="attn_implementation for --arch (sdpa, eager)")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--batch-sizes", type=_ints, default=[1, 3, 8],
                   help="comma-separated; the first is the reference (default 1,3,8)")
    a.add_argument("--seq-len", type=int, default=7,
                   help="prompt length (default 7: odd, so vectorised CPU kernels reach their scalar tails)")
    a.add_argument("--target-row", default="middle", help="middle, first, last or an index (default middle)")
    a.add_argument("--seed", type=int, default=0, help="seeds the prompt and the neighbours")
    a.add_argument("--all", action="store_true",
                   help="also list every divergent node (root: no input differs; inherits: an input does)")
    a.set_defaults(func=_cmd_audit)

    from .server.cli import add_subcommands as _add_server_commands  # serve, check-server

    _add_server_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"detcompile: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
