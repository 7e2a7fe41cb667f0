"""``detcompile serve`` and ``detcompile check-server``: ``add_subcommands(sub)`` registers both on
the main parser's subparsers (``detcompile/cli.py`` calls it)."""
from __future__ import annotations

import argparse
import os
import sys


def add_subcommands(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP: /generate (the reference system's API), the OpenAI "
                                     "API, /metrics; deterministic by default")
    s.add_argument("--model", default="demo",
                   help="a local checkpoint directory, or demo (default: the embedded demo model, no download), "
                        "tiny, llama3-8b-random (random weights of Llama-3-8B's shapes, CUDA)")
    s.add_argument("--tokenizer", default=None, help="'tiny' (the local character tokenizer) or a tokenizer directory "
                                                     "(default: the model's own)")
    s.add_argument("--served-model-name", default=None, help="the model name the OpenAI API expects")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=30000, help="port (0: any free port; the chosen one is printed)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: the DETCOMPILE_API_KEY environment variable, if set)")
    s.add_argument("--no-deterministic", action="store_true",
                   help="stock kernels: faster, NOT batch-invariant (the fingerprint says so)")
    s.add_argument("--max-queue", type=int, default=1024,
                   help="sequences that may wait beyond --max-num-seqs; past that, 503 with Retry-After")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--seed", type=int, default=0, help="weight seed of the named random models")
    s.add_argument("--max-num-seqs", type=int, default=None, help="running batch size (default 256; 32 on the CPU)")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, <= 8192)")
    s.add_argument("--kv-cache-fraction", type=float, default=0.85, help="GPU memory fraction for weights + KV cache")
    s.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GiB (overrides the fraction)")
    s.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV page (default: the attention backend's, 16; fa3: its key tile, 128)")
    s.add_argument("--attention-backend", default="triton", choices=["triton", "fa3", "flashinfer"],
                   help="the engine's attention kernel: triton (default, detcompile's own), fa3 (pip install "
                        "'detcompile[fa3]', Hopper, bf16) or flashinfer (pip install 'detcompile[flashinfer]'); "
                        "each is bitwise stable within itself, their bits differ from each other")
    s.add_argument("--chunked-prefill-size", type=int, default=2048)
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--no-cuda-graphs", action="store_true")
    s.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallelism: N processes, one per rank (gloo on the CPU; NCCL on CUDA, rank r on "
                        "cuda:r), rank 0 serving HTTP; Llama-style models, deterministic only. Every N, 1 "
                        "included, gives the same bits, which differ from no --tp (docs/tensor_parallel.md)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-server", help="send the same prompts to a running server in varying batch "
                                            "compositions and count distinct outputs per prompt (exit 1 if any > 1)")
    c.add_argument("--url", default="http://127.0.0.1:30000")
    c.add_argument("--mode", default="single", choices=["single", "mixed", "prefix", "radix", "p_vs_d", "all", "load"],
                   help="all = the first five; load = serial vs concurrent equality, throughput, latency")
    c.add_argument("--n-trials", type=int, default=50)
    c.add_argument("--n-start", type=int, default=1, help="batch size of the first trial")
    c.add_argument("--max-new-tokens", type=int, default=100)
    c.add_argument("--n-requests", type=int, default=64, help="requests of --mode load")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--sampling-seed", type=int, default=42)
    c.add_argument("--concurrency", type=int, default=8, help="parallel HTTP clients used to mix batches")
    c.add_argument("--api-key", default=None, help="default: the DETCOMPILE_API_KEY environment variable")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    c.add_argument("--quiet", action="store_true", help="print only the summary lines")
    c.set_defaults(func=cmd_check_server)


def _positive(name: str, v, allow_zero: bool = False) -> None:
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def cmd_serve(args) -> int:
    import logging

    for name in ("max_num_seqs", "max_model_len", "kv_cache_gb", "block_size", "chunked_prefill_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--max-queue", args.max_queue, allow_zero=True)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.tp is not None:
        from .tensor_parallel import check_tp_args

        check_tp_args(args)  # before any rank starts, any weight is loaded or the port is taken
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"detcompile serve needs {', '.join(missing)}: pip install 'detcompile[serve]'")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(args)
    if args.tp is not None and args.tp > 1:
        from .tensor_parallel import launch

        return launch(args, sock)  # the ranks load the model; rank 0 serves on sock

    from .loading import load_model

    model, tok, name = load_model(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                                  seed=args.seed)
    digests = None
    if args.tp is not None:  # --tp 1: one rank, in this process
        from .fingerprint import model_digests

        digests = model_digests(model)  # of the whole model: the engine shards it in place
    engine = build_engine(args, model, tok, tensor_parallel_size=args.tp)
    return serve_http(args, sock, engine, name, digests)


def bind(args):
    """The HTTP socket, bound first: a taken port fails now, not after minutes of compiling."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise RuntimeError(f"cannot bind {args.host}:{args.port}: {e}") from None
    return sock


def build_engine(args, model, tok, *, tensor_parallel_size: int | None = None):
    """The ``Engine`` of ``serve``'s options over a loaded model (this rank's, under --tp)."""
    import logging

    from ..engine import Engine

    log = logging.getLogger("detcompile.server")
    on_cpu = next(model.parameters()).device.type == "cpu"
    kw = dict(tokenizer=tok, max_num_seqs=args.max_num_seqs or (32 if on_cpu else 256),
              max_model_len=args.max_model_len, kv_cache_fraction=args.kv_cache_fraction, block_size=args.block_size,
              chunked_prefill_size=args.chunked_prefill_size, enable_prefix_caching=not args.no_prefix_caching,
              cuda_graphs=not args.no_cuda_graphs, deterministic=not args.no_deterministic,
              attention_backend=args.attention_backend, tensor_parallel_size=tensor_parallel_size,
              log=lambda msg: log.info("%s", msg))
    if args.kv_cache_gb is not None:
        kw["kv_cache_bytes"] = int(args.kv_cache_gb * 2**30)
    if tensor_parallel_size is not None and not on_cpu and kw["cuda_graphs"]:
        # Capturing the TP collectives inside CUDA graphs is not built (docs/tensor_parallel.md).
        log.info("--tp: CUDA graphs off (the tensor-parallel collectives are not captured yet)")
        kw["cuda_graphs"] = False
    return Engine(model, **kw)


def serve_http(args, sock, engine, name: str, digests: dict | None = None) -> int:
    """Serve ``engine`` over HTTP on ``sock`` until uvicorn stops (Ctrl-C, SIGTERM)."""
    from .app import create_app
    from .state import Server

    api_key = args.api_key or os.environ.get("DETCOMPILE_API_KEY") or None
    server = Server(engine, model_name=args.served_model_name or name, api_key=api_key, max_queue=args.max_queue,
                    model_digests=digests)
    app = create_app(server)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tp = f", tensor parallel {engine.tensor_parallel_size}" if engine.tensor_parallel_size is not None else ""
    print(f"detcompile server: model {server.model_name}, "
          f"{'deterministic' if engine.deterministic else 'STOCK kernels (not deterministic)'}{tp}, "
          f"fingerprint {server.fingerprint}, api key {'required' if api_key else 'off'}", flush=True)
    print(f"detcompile server listening on http://{shown}:{port}", flush=True)

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if server.loop.alive:  # a forced exit skips the app's shutdown (under --tp: the other ranks wait)
            server.loop.stop()
    return 0


def cmd_check_server(args) -> int:
    from .checker import run_check

    if min(args.n_trials, args.n_start, args.max_new_tokens, args.concurrency, args.n_requests) < 1:
        raise ValueError("--n-trials, --n-start, --max-new-tokens, --concurrency and --n-requests must be >= 1")
    return run_check(args)


def main(argv=None) -> int:  # pragma: no cover  (python -m detcompile.server.cli)
    p = argparse.ArgumentParser(prog="detcompile")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)
