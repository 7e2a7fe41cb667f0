"""Architecture sweep: does every Hugging Face causal-LM architecture compile deterministically?

    python -m benchmarks.model_sweep [--archs a,b] [--time-budget S] [--device cpu|cuda]
                                     [--dtype float32|bfloat16|float16] [--out docs/models.md]
    python -m benchmarks.model_sweep --archs ctrl,xlnet --widths 64,256,1024 --dtypes bfloat16,float32 \
                                     --device cuda [--out docs/models_variants.md]

For each architecture of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` it builds a tiny random-weight model
(``detcompile.models.tiny_causal_lm``) and runs :func:`check_model`, which checks in order:

1. the eager forward works (else ``eager-fails``: the tiny config or transformers itself, not detcompile);
2. ``torch.compile(model, backend="deterministic", options={"strict": True})`` compiles and runs
   (``strict-error`` with the op names when the audit flags ops; ``compile-error`` for anything else);
3. the target row's logits are bitwise equal (``torch.equal``) at batch sizes 1, 3 and 8 with different
   neighbours (else ``not-invariant``);
4. they are close to eager: relative error < 1e-3 in float32, < 3e-2 in bfloat16 (else ``inaccurate``).
   Two yardsticks can still pass a model that misses: in 16-bit, being as close to a float32 copy as
   eager 16-bit is (``half_precision_ok``); and being within the tolerance of stock
   ``torch.compile(backend="eager")`` when stock Dynamo itself is that far from eager
   (``stock_compile_explains``: the model's Python changes under tracing). The reason column says so.

Every architecture runs in its own subprocess with a time limit (``timeout``), so a hang or a crash
cannot stop the sweep. The results go to a markdown table (``--out``), a JSON file and a PNG bar chart
beside it.

``--widths`` and ``--dtypes`` make it a variant sweep: every (architecture, width, dtype) is one case, each
model built at that hidden size (``tiny_causal_lm(width=...)``: FFN 2x, heads of 64, vocabulary width^2/16).
The GPU matmul's launch config depends on M (12, 36, 96 rows here) and N; in 16-bit, at 96 rows, the
tiny default (width 64, vocabulary 256) only gets 64x128 tiles, the 128x128 six-stage tiles need N > 8448
(the LM head from width 512) and the 128x256 tiles N > 33k (width 1024): ``--widths 64,512,1024`` covers all
three (ctrl, xlnet and trocr crashed in the deep-pipeline configs once). A variant sweep writes its own
report (default ``docs/models_variants.md``), one row per case, and prints each case's status and the first
line of its error as it finishes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter without a GPU; it must be set before triton.jit runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

STATUSES = ["pass", "eager-fails", "compile-error", "strict-error", "not-invariant", "inaccurate", "timeout"]
STATUS_COLORS = {
    "pass": "#2e7d32", "eager-fails": "#9e9e9e", "compile-error": "#c62828", "strict-error": "#ef6c00",
    "not-invariant": "#6a1b9a", "inaccurate": "#1565c0", "timeout": "#5d4037",
}
BATCH_SIZES = (1, 3, 8)
TARGET_ROW = {1: 0, 3: 1, 8: 5}
SEQ = 12
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2, torch.float64: 1e-6}
DEFAULT_TIME_BUDGET = 90.0


@dataclasses.dataclass
class Result:
    arch: str
    status: str
    reason: str = ""
    stage: str = ""  #: the last stage reached: build, eager, compile, invariance, accuracy, done
    seconds: float = 0.0
    ops: list[str] = dataclasses.field(default_factory=list)  #: strict-error: the flagged ops
    rel_err: float | None = None
    params: int | None = None
    graph_breaks: int | None = None
    detcompile_frame: str = ""  #: compile-error: innermost detcompile source line in the traceback
    #: strict-error: the same checks without strict mode (the flagged ops run with their stock kernels):
    #: "invariant", "not-invariant", "inaccurate" or "error: ..." (evidence, not a proof, for each flagged op)
    non_strict: str = ""
    width: int | None = None  #: variant sweeps: the hidden size the model was built at
    dtype: str | None = None  #: variant sweeps: the model's dtype (a plain sweep has one, in its environment)
    #: compile-error: the full traceback (the worker prints it to its log; not in the JSON)
    trace: str = dataclasses.field(default="", repr=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        del d["trace"]
        for key in ("width", "dtype"):  # a plain sweep's JSON stays as it was
            if d[key] is None:
                del d[key]
        return d

    @property
    def key(self) -> tuple:
        return self.arch, self.width, self.dtype

    @property
    def label(self) -> str:
        return case_label(self.arch, self.width, self.dtype)


def case_label(arch: str, width: int | None, dtype: str | None) -> str:
    """``ctrl@1024/float32`` for a variant case, the bare name in a plain sweep."""
    if width is None and dtype is None:
        return arch
    return f"{arch}@{width}/{dtype}"


def first_line(reason: str, limit: int = 200) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# The check: any model, not only Hugging Face architectures.
# ------------------------------------------------------------------------------------------------


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__} output")


def _allowed_ids(vocab: int, special: set[int]) -> torch.Tensor:
    ids = torch.tensor([i for i in range(3, vocab) if i not in special])
    return ids if len(ids) else torch.arange(vocab)


def make_batch(target: torch.Tensor, bs: int, allowed: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    """[bs, L] ids: the target at row TARGET_ROW[bs], random different neighbours elsewhere."""
    g = torch.Generator().manual_seed(seed)
    batch = allowed[torch.randint(0, len(allowed), (bs, target.shape[-1]), generator=g)]
    row = TARGET_ROW.get(bs, bs // 2)
    batch[row] = target
    return batch, row


def half_precision_ok(err_vs_eager: float, tol: float, eager_vs_fp32: float, ours_vs_fp32: float) -> bool:
    """The 16-bit accuracy verdict when the compiled logits are more than ``tol`` from eager's.

    Both are 16-bit approximations of the float32 model; on models with discontinuities (top-k over a
    dynamic mask, routing ties) eager 16-bit itself can be far from float32, and any other rounding then
    lands elsewhere too. The compiled model passes when it is as close to float32 as eager is (within
    2x, or within ``tol``)."""
    if err_vs_eager < tol:
        return True
    return ours_vs_fp32 <= max(tol, 2.0 * eager_vs_fp32)


def stock_compile_explains(tol: float, stock_vs_eager: float, ours_vs_stock: float) -> bool:
    """The verdict when the compiled logits are far from eager's, but stock Dynamo (``backend="eager"``,
    no detcompile pass) is just as far: the model's Python takes another branch when traced (e.g. a
    transformers attention mask that is materialised under Dynamo and skipped in eager). The reference is
    then stock ``torch.compile``, and the compiled model passes when it is within ``tol`` of it."""
    return stock_vs_eager >= tol and ours_vs_stock < tol


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / den).item() if den > 0 else (out - ref).norm().item()


def _exception_chain(e: BaseException):
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [getattr(x, "inner_exception", None), x.__cause__, x.__context__]


# "  - op: reason" lines of a NondeterminismError; an op may be two words ("graph break").
_OP_LINE = re.compile(r"^\s+- ([^:\n]+?): (.+)$", re.M)


def strict_ops(e: BaseException) -> list[tuple[str, str]] | None:
    """(op, reason) pairs if ``e`` is (or wraps) a ``NondeterminismError``, else None."""
    from detcompile.passes import NondeterminismError

    for x in _exception_chain(e):
        if isinstance(x, NondeterminismError):
            pairs = _OP_LINE.findall(str(x))
            return list(dict.fromkeys(pairs)) or [("?", str(x).splitlines()[0])]
    return None


def _innermost(e: BaseException) -> BaseException:
    """The root cause: Dynamo wraps backend errors (BackendCompilerFailed, InternalTorchDynamoError)."""
    chain = list(_exception_chain(e))
    for x in reversed(chain):
        if not type(x).__module__.startswith("torch._dynamo"):
            return x
    return chain[-1]


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _detcompile_frame(e: BaseException) -> str:
    """The innermost frame inside detcompile (not the backend's own re-raise), if any."""
    for x in _exception_chain(e):
        frames = [f for f in traceback.extract_tb(x.__traceback__) if "/detcompile/" in f.filename]
        frames = [f for f in frames if not f.filename.endswith("detcompile/backend.py") or f.name != "rewrite_aten_graph"]
        if frames:
            f = frames[-1]
            path = f.filename[f.filename.rindex("/detcompile/") + 1 :]
            return f"{path}:{f.lineno} in {f.name}"
    return ""


def classify_compile_exception(e: BaseException) -> tuple[str, str, list[str], str]:
    """(status, reason, ops, detcompile frame) for an exception raised while compiling or running compiled."""
    ops = strict_ops(e)
    if ops is not None:
        names = list(dict.fromkeys(op for op, _ in ops))
        reason = "; ".join(f"{op} ({why})" for op, why in ops)
        return "strict-error", reason, names, ""
    root = _innermost(e)
    frame = _detcompile_frame(e)
    reason = _one_line(root)
    if frame:
        reason += f" [at {frame}]"
    return "compile-error", reason, [], frame


def check_model(
    model: torch.nn.Module,
    vocab: int,
    *,
    name: str = "model",
    device: str | torch.device = "cpu",
    special_ids: set[int] = frozenset(),
    seq: int = SEQ,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    tolerance: float | None = None,
    progress=None,
    non_strict_follow_up: bool = True,
) -> Result:
    """Run the four checks on ``model`` (called with ``[batch, seq]`` token ids) and classify it.

    ``progress(stage, result_so_far)`` is called as each stage starts, so that a caller can tell where a hang was. On a
    strict-error, ``non_strict_follow_up`` runs checks 3 and 4 again without strict mode (the flagged ops
    on their stock kernels) and records the outcome in ``Result.non_strict``.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    t0 = time.time()
    res = Result(arch=name, status="pass")
    res.params = sum(p.numel() for p in model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 3e-2)
    allowed = _allowed_ids(vocab, set(special_ids))
    g = torch.Generator().manual_seed(7)
    target = allowed[torch.randint(0, len(allowed), (seq,), generator=g)]

    def stage(s):
        res.stage = s
        if progress is not None:
            progress(s, res)

    def done(status, reason=""):
        res.status, res.reason, res.seconds = status, reason, round(time.time() - t0, 1)
        return res

    # (1) eager
    stage("eager")
    try:
        with torch.no_grad():
            eager = _logits(model(target[None].to(device)))[0].float()
    except Exception as e:  # noqa: BLE001
        return done("eager-fails", "eager forward: " + _one_line(_innermost(e)))
    if not torch.isfinite(eager).all():
        return done("eager-fails", "eager logits are not finite")

    def run_compiled(strict: bool) -> dict[int, torch.Tensor]:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="deterministic", options={"strict": strict})
        rows = {}
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-strict: the fallback warning lists the flagged ops
                for i, bs in enumerate(batch_sizes):
                    batch, row = make_batch(target, bs, allowed, seed=i)
                    rows[bs] = _logits(compiled(batch.to(device)))[row].float()
                    if i == 0 and strict:
                        stage("invariance")
        finally:
            if strict:
                res.graph_breaks = sum(counters["graph_break"].values())
            torch._dynamo.reset()
        return rows

    def judge(rows) -> tuple[str, str, float | None]:
        """(3) bitwise invariance of the target row, then (4) accuracy against eager."""
        ref = rows[batch_sizes[0]]
        differ = [bs for bs in batch_sizes[1:] if not torch.equal(rows[bs], ref)]
        if differ:
            worst = max((rows[bs] - ref).abs().max().item() for bs in differ)
            return "not-invariant", (
                f"target-row logits differ from batch {batch_sizes[0]} at batch size(s) {differ} "
                f"(max abs diff {worst:.3g}; {res.graph_breaks} graph break(s))"
            ), None
        if not torch.isfinite(ref).all():
            return "inaccurate", "compiled logits are not finite (eager's are)", None
        err = rel_err(ref, eager)
        if err < tol:
            return "pass", "", err
        note = f"relative error {err:.3g} vs eager"
        fp32 = float32_reference() if dtype in (torch.bfloat16, torch.float16) else None
        if fp32 is not None:
            e_eager, e_ours = rel_err(eager, fp32), rel_err(ref, fp32)
            note += f"; vs the float32 model: eager {e_eager:.3g}, compiled {e_ours:.3g}"
            if half_precision_ok(err, tol, e_eager, e_ours):
                return "pass", note + " (as close as eager)", err
        stock = stock_compile_reference()
        if stock is not None:
            e_stock_eager, e_ours_stock = rel_err(stock, eager), rel_err(ref, stock)
            note += f"; stock torch.compile(backend='eager') is {e_stock_eager:.3g} from eager, compiled {e_ours_stock:.3g} from it"
            if stock_compile_explains(tol, e_stock_eager, e_ours_stock):
                return "pass", note + " (the model itself changes under Dynamo)", err
        return "inaccurate", note + f" (tolerance {tol:g})", err

    def stock_compile_reference() -> torch.Tensor | None:
        """The target row through stock ``torch.compile(backend="eager")`` (Dynamo, no detcompile), or None."""
        try:
            torch._dynamo.reset()
            stock = torch.compile(model, backend="eager")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _logits(stock(target[None].to(device)))[0].float()
        except Exception:  # noqa: BLE001 - then the plain verdict stands
            return None
        finally:
            torch._dynamo.reset()

    def float32_reference() -> torch.Tensor | None:
        """Eager logits of a float32 copy of the model (same, upcast weights), or None if it fails."""
        try:
            m32 = copy.deepcopy(model).float()
            with torch.no_grad():
                return _logits(m32(target[None].to(device)))[0].float()
        except Exception:  # noqa: BLE001 - then the plain verdict stands
            return None

    # (2) compile (strict) and run
    stage("compile")
    try:
        rows = run_compiled(strict=True)
    except Exception as e:  # noqa: BLE001
        status, reason, ops, frame = classify_compile_exception(e)
        res.ops, res.detcompile_frame = ops, frame
        res.trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        if status == "strict-error" and non_strict_follow_up:
            # Evidence for each flagged op: does the model stay invariant with its stock kernel here?
            res.status, res.reason = status, reason  # reported as it is if the follow-up runs out of time
            stage("non-strict")
            try:
                ns_status, ns_reason, ns_err = judge(run_compiled(strict=False))
                res.non_strict = "invariant" if ns_status == "pass" else ns_status
                res.non_strict += f" (rel. err {ns_err:.2g})" if ns_err is not None else f" ({ns_reason})"
            except Exception as e2:  # noqa: BLE001
                res.non_strict = "error: " + _one_line(_innermost(e2), 150)
        return done(status, reason)

    stage("accuracy")
    status, reason, res.rel_err = judge(rows)
    if status == "pass":
        stage("done")
    return done(status, reason)


def vocab_of(model: torch.nn.Module) -> int:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        vocab = min(vocab or emb.num_embeddings, emb.num_embeddings)
    return int(vocab)


def check_arch(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress=None,
               width: int | None = None) -> Result:
    """Build ``arch``'s tiny causal LM (at hidden size ``width``, default the tiny 64) and run :func:`check_model`."""
    from detcompile.models import special_token_ids, tiny_causal_lm

    t0 = time.time()
    if progress is not None:
        progress("build", None)
    try:
        model = tiny_causal_lm(arch, dtype=dtype, device=device, width=width)
        vocab = vocab_of(model)
        special = special_token_ids(model.config)
    except Exception as e:  # noqa: BLE001
        return Result(arch, "eager-fails", "tiny config/model build: " + _one_line(_innermost(e)), "build",
                      round(time.time() - t0, 1))
    res = check_model(model, vocab, name=arch, device=device, special_ids=special, progress=progress)
    res.seconds = round(time.time() - t0, 1)
    return res


# ------------------------------------------------------------------------------------------------
# One architecture per subprocess.
# ------------------------------------------------------------------------------------------------


def _worker(arch: str, device: str, dtype: str, result_file: str, width: int | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    import detcompile  # noqa: F401

    path = Path(result_file)

    def progress(stage, res=None):
        data = {"arch": arch, "stage": stage}
        if stage == "non-strict" and res is not None:
            data["partial"] = res.to_json()
        path.write_text(json.dumps(data))

    res = check_arch(arch, device=device, dtype=getattr(torch, dtype), progress=progress, width=width)
    if res.trace:
        print(res.trace, flush=True)  # the log (run_one's --logs) keeps what the one-line reason leaves out
    path.write_text(json.dumps({**res.to_json(), "final": True}))


def run_one(arch: str, device: str, dtype: str, time_budget: float, threads: int | None = None,
            width: int | None = None, log_dir: str | Path | None = None) -> Result:
    """Run ``check_arch`` in a subprocess killed after ``time_budget`` seconds; its output is copied to
    ``log_dir/<case>.log`` when given."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        log_file = os.path.join(tmp, "log.txt")
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "benchmarks.model_sweep", "--worker", arch, "--device", device, "--dtype",
               dtype, "--result-file", result_file] + (["--width", str(width)] if width is not None else [])
        with open(log_file, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parent.parent))
            try:
                rc = proc.wait(timeout=time_budget)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
                proc.wait()
                rc = None
        data = {}
        if os.path.exists(result_file):
            try:
                data = json.loads(Path(result_file).read_text())
            except json.JSONDecodeError:
                data = {}
        log_text = Path(log_file).read_text(errors="replace")
        log_tail = log_text[-2000:]
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            label = arch if width is None else f"{arch}@{width}_{dtype}"
            (Path(log_dir) / f"{label}.log").write_text(log_text)
    elapsed = round(time.time() - t0, 1)
    if data.get("final"):
        data.pop("final")
        res = Result(**data)
        res.seconds = elapsed
        return res
    stage = data.get("stage", "startup")
    if data.get("partial"):  # a strict-error whose non-strict follow-up did not finish
        res = Result(**data["partial"])
        res.non_strict = f"timed out (limit {time_budget:g} s)" if rc is None else f"worker died (exit code {rc})"
        res.seconds = elapsed
        return res
    if rc is None:
        return Result(arch, "timeout", f"no result after {time_budget:g} s (during {stage})", stage, elapsed)
    last = [ln for ln in log_tail.splitlines() if ln.strip()][-1:] or [""]
    why = f"worker died (exit code {rc}{', killed: out of memory?' if rc in (-9, 137) else ''}) during {stage}"
    why += f": {last[0][:200]}" if last[0] else ""
    status = "eager-fails" if stage in ("startup", "build", "eager") else "compile-error"
    return Result(arch, status, why, stage, elapsed)


# ------------------------------------------------------------------------------------------------
# Reports.
# ------------------------------------------------------------------------------------------------


def counts(results: list[Result]) -> dict[str, int]:
    c = {s: 0 for s in STATUSES}
    for r in results:
        c[r.status] = c.get(r.status, 0) + 1
    return c


def environment(device: str, dtype: str) -> dict:
    import platform

    import transformers

    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    env["commit"] = git_commit()
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return env


def resumed_environment(prior: dict, now: dict, archs: list[str]) -> dict:
    """The environment of a resumed sweep: the first run's, plus a record of this (partial) run, so
    the report keeps saying when and how the bulk of the table was measured."""
    env = dict(prior.get("environment") or now)
    rerun = {"archs": list(archs), "date": now["date"], "commit": now.get("commit", "")}
    for key in ("torch", "transformers", "device_name", "dtype"):
        if now.get(key) != env.get(key):
            rerun[key] = now.get(key)  # only what differs from the first run
    env["reruns"] = list(env.get("reruns", [])) + [rerun]
    return env


def git_commit() -> str:
    """HEAD of the repository, and the files of detcompile/ with uncommitted changes ("" outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "detcompile"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    files = [line[3:] for line in dirty.splitlines() if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(files)}" if head and files else "")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, results: list[Result], env: dict, not_run: list[str], time_budget: float,
                   wall: float, png_name: str | None, in_progress: bool = False) -> None:
    c = counts(results)
    variant = "widths" in env  # a variant sweep: one row per (architecture, width, dtype)
    if variant:
        tolerance = "the dtype's relative error (" + ", ".join(
            f"{d} {TOLERANCE.get(getattr(torch, d), 3e-2):g}" for d in env["dtypes"]) + ") of eager"
    else:
        tolerance = f"{TOLERANCE.get(getattr(torch, env['dtype']), 3e-2):g} relative error of eager"
    lines = [
        "# Architecture sweep" + (": widths and dtypes" if variant else ""),
        "",
        "Every architecture of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built from a tiny config with "
        "random weights (`detcompile.models.tiny_causal_lm`), checked by `benchmarks/model_sweep.py`: "
        "(1) the eager forward works, (2) `torch.compile(model, backend=\"deterministic\", "
        "options={\"strict\": True})` compiles and runs, (3) the target row's logits are bitwise equal at batch "
        f"sizes {', '.join(map(str, BATCH_SIZES))} with different neighbours, (4) they are within "
        + tolerance
        + ("" if env["dtype"] == "float32" else
           " (or, 16-bit only, at most 2x as far from a float32 copy of the model as eager 16-bit is)")
        + ", or, for a model whose own code changes under Dynamo, within it of stock "
        "`torch.compile(backend=\"eager\")`"
        + f". Sequence length {SEQ}."
        + (" Each architecture is built at every width (hidden size; FFN 2x, attention heads of 64, a "
           "vocabulary growing as the width squared: `detcompile.models.width_sizes`) in every dtype."
           if variant else ""),
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']} ({env['device_name']}), dtype {env['dtype']}"
        + (f", widths {', '.join(map(str, env['widths']))}" if variant else ""),
        f"- torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"- detcompile commit: {env.get('commit') or 'unknown'}"
        + (f" at the start, {env['commit_end']} at the end" if env.get("commit_end", env.get("commit")) != env.get("commit") else ""),
        f"- {env.get('jobs', 1)} {'case' if variant else 'architecture'}(s) at a time"
        + (f", {env['threads']} torch thread(s) each" if env.get("threads") else ""),
        f"- time limit per {'case' if variant else 'architecture'}: {time_budget:g} s (each in its own "
        f"subprocess); sweep wall time {wall / 60:.1f} min",
        f"- {'cases' if variant else 'architectures'} run: {len(results)}"
        + (f" of {len(results) + len(not_run)}" if not_run else ""),
    ]
    for rr in env.get("reruns", []):
        differs = ", ".join(f"{k} {rr[k]}" for k in ("torch", "transformers", "device_name", "dtype") if k in rr)
        lines.append(f"- re-run on {rr['date']} (commit {rr.get('commit') or 'unknown'}"
                     + (f"; {differs}" if differs else "") + f"): {', '.join(rr['archs'])}")
    lines += [
        "- counts: " + ", ".join(f"{s} {n}" for s, n in c.items()),
    ]
    if variant:  # where the failures are: by width and dtype
        for w, d in sorted({(r.width or 0, r.dtype or "") for r in results}):
            cc = counts([r for r in results if (r.width or 0, r.dtype or "") == (w, d)])
            lines.append(f"  - width {w}, {d}: " + ", ".join(f"{s} {n}" for s, n in cc.items() if n))
    if not_run:
        why = "sweep still in progress" if in_progress else "the sweep's total time budget ran out"
        lines.append(f"- not run ({why}): {', '.join(not_run)}")
    lines += [
        "",
        "Statuses: `eager-fails`: the tiny config or the eager forward fails (not detcompile's problem; the "
        "reason is recorded); `compile-error`: compiling or running the compiled model raised (the reason names "
        "the detcompile frame when the error came from detcompile); `strict-error`: the audit flagged ops that "
        "no pass made batch-invariant (the same model is then checked again without strict mode, the flagged ops on "
        "their stock kernels: \"invariant\" there is evidence, at these sizes on this device, that the flagged op "
        "did not break invariance); `not-invariant`: the target row's bits changed with the batch; "
        "`inaccurate`: invariant but too far from eager; `timeout`: no result within the time limit.",
        "",
        "Rare ops the sweep turned up, and what handles them (`docs/design.md`): the depthwise causal conv1d of "
        "Mamba/SSM/hybrid models (Mamba, Mamba2, Jamba, Zamba, Bamba, Falcon-H1, Nemotron-H, LFM2, ...) and "
        "small grouped conv1d: the `convolution` pass, `detcompile.conv1d`; the triangular solves of the gated "
        "DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid): the `solve_triangular` pass, "
        "`detcompile.solve_triangular`; DBRX's 1-norm router: the `reductions` pass (vector norms of order 1, 2, "
        "and +-inf); on the CPU, the complex rotary embeddings of DeepSeek-V2 and Llama 4 (`polar`, complex "
        "`mul`) and xLSTM's `logsigmoid`: the `cpu_pointwise` pass. 2-D/3-D and transposed convolutions, other "
        "complex arithmetic on the CPU and norms of other orders stay flagged by the audit.",
        "",
    ]
    if png_name:
        lines += [f"![status counts]({png_name})", ""]
    if variant:
        lines += ["| architecture | width | dtype | status | reason | time (s) |",
                  "| --- | --- | --- | --- | --- | --- |"]
    else:
        lines += ["| architecture | status | reason | time (s) |", "| --- | --- | --- | --- |"]
    for r in sorted(results, key=_sort_key):
        reason = r.reason or (f"rel. err {r.rel_err:.2g}" if r.rel_err is not None else "")
        if r.status == "strict-error" and r.non_strict:
            reason += f". Without strict mode: {r.non_strict}"
        if r.status == "pass" and r.graph_breaks:
            reason += f"; {r.graph_breaks} graph break(s): the code between graphs ran eagerly, unaudited"
        case = f"{r.arch} | {r.width} | {r.dtype}" if variant else r.arch
        lines.append(f"| {case} | {r.status} | {_md_escape(reason)} | {r.seconds:g} |")
    notes = notes_path(path)
    if notes.exists():  # hand-written notes on this run, kept across re-renders
        lines += ["", notes.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def _sort_key(r: Result) -> tuple:
    return r.arch, r.width or 0, r.dtype or ""


def notes_path(report: Path) -> Path:
    """``docs/models_gpu.md`` -> ``docs/models_gpu_notes.md``: appended to the report when present."""
    return report.with_name(report.stem + "_notes.md")


def write_png(path: Path, results: list[Result], env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(list(c), list(c.values()), color=[STATUS_COLORS.get(s, "#777777") for s in c])
    ax.bar_label(bars)
    ax.set_ylim(0, max(c.values()) * 1.12 + 1)
    ax.set_ylabel("cases" if "widths" in env else "architectures")
    ax.set_title(f"detcompile architecture sweep ({len(results)} {'cases' if 'widths' in env else 'archs'}, "
                 f"{env['device']}, {env['dtype']}, "
                 f"torch {env['torch']}, transformers {env['transformers']})", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(out: Path, results: list[Result], env: dict, not_run: list[str], time_budget: float,
                  wall: float, in_progress: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    try:
        write_png(png, results, env)
    except ImportError as e:  # matplotlib is in the [bench] extra; the table still gets written
        warnings.warn(f"no plot ({e}); pip install -e '.[bench]' for {png.name}")
        png = None
    write_markdown(out, results, env, not_run, time_budget, wall, png.name if png else None, in_progress)
    payload = {"environment": env, "in_progress": in_progress, "time_budget_s": time_budget, "wall_s": round(wall, 1), "counts": counts(results),
               "not_run": not_run, "results": [r.to_json() for r in sorted(results, key=_sort_key)]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------


def all_archs() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _dtype_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    return names


DTYPES = ("float32", "bfloat16", "float16")
VARIANT_OUT = "docs/models_variants.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", help="comma-separated architectures (default: every causal-LM architecture)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                   help="seconds per architecture (per case) before it counts as a timeout (default %(default)s)")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole sweep: architectures not started by then are listed as not run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--widths", type=_int_list,
                   help="variant sweep: comma-separated hidden sizes, multiples of 64 (e.g. 64,256,1024)")
    p.add_argument("--dtypes", type=_dtype_list, help="variant sweep: comma-separated dtypes (default: --dtype)")
    p.add_argument("--out", default=None,
                   help=f"markdown table; .json and .png are written beside it (default docs/models.md, "
                        f"{VARIANT_OUT} for a variant sweep)")
    p.add_argument("--jobs", type=int, default=1, help="architectures (cases) run at once (default 1)")
    p.add_argument("--logs", help="folder for each worker's output (full tracebacks of compile errors)")
    p.add_argument("--resume", action="store_true", help="keep the results already in the JSON beside --out; architectures named by --archs are re-run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        _worker(args.worker, args.device, args.dtype, args.result_file, args.width)
        return 0

    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from detcompile.models import BASE_WIDTH, width_sizes

    variant = args.widths is not None or args.dtypes is not None
    widths: list[int | None] = [None]
    dtypes: list[str | None] = [None]
    if variant:
        widths = args.widths or [BASE_WIDTH]
        dtypes = args.dtypes or [args.dtype]
        for w in widths:
            try:
                width_sizes(w)
            except ValueError as e:
                p.error(str(e))
    archs = args.archs.split(",") if args.archs else all_archs()
    cases = [(a, w, d) for a in archs for w in widths for d in dtypes]
    out = Path(args.out or (VARIANT_OUT if variant else "docs/models.md"))
    done: dict[tuple, Result] = {}
    prior: dict = {}
    if args.resume and out.with_suffix(".json").exists():
        prior = json.loads(out.with_suffix(".json").read_text())
        if ("widths" in (prior.get("environment") or {})) != variant:
            p.error(f"--resume: {out.with_suffix('.json')} is a {'plain' if variant else 'variant'} sweep's; "
                    "use another --out")
        for r in prior["results"]:
            res = Result(**r)
            done[res.key] = res
    # Named architectures are re-run even when the JSON has them; the rest of the JSON is kept, so a
    # few re-runs merge into a full sweep's table.
    todo = cases if args.archs else [c for c in cases if c not in done]
    env = environment(args.device, ",".join(dtypes) if variant else args.dtype)
    if variant:
        env["widths"], env["dtypes"] = widths, dtypes
    if done:
        env = resumed_environment(prior, env, [case_label(*c) for c in todo])
        if variant:  # the header lists every width and dtype the table holds
            env["widths"] = sorted(set(env["widths"]) | set(widths))
            env["dtypes"] = list(dict.fromkeys(env["dtypes"] + dtypes))
            env["dtype"] = ",".join(env["dtypes"])
    t0 = time.time()
    results: dict[tuple, Result] = {k: r for k, r in done.items() if k not in todo}
    not_run: list[str] = []
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    if not done:
        env["jobs"], env["threads"] = max(1, args.jobs), threads

    def job(case):
        arch, width, dtype = case
        if args.total_budget is not None and time.time() - t0 > args.total_budget:
            return case, None
        res = run_one(arch, args.device, dtype or args.dtype, args.time_budget, threads, width=width,
                      log_dir=args.logs)
        res.width, res.dtype = width, dtype
        return case, res

    what = "cases" if variant else "architectures"
    bar = tqdm(total=len(todo), desc=what, unit="case" if variant else "arch")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for case, res in pool.map(job, todo):
            if res is None:
                not_run.append(case_label(*case))
            else:
                results[case] = res
                bar.set_postfix_str(f"{res.label}: {res.status}")
                if variant:  # one line per case, so the log alone says what failed and why
                    why = "" if res.status == "pass" else f": {first_line(res.reason)}"
                    tqdm.write(f"{res.status:>14} {res.label}{why}")
                # Written as it goes, so an interrupted sweep still leaves its results.
                pending = [case_label(*c) for c in todo if c not in results]
                write_reports(out, list(results.values()), env, pending, args.time_budget, time.time() - t0,
                              in_progress=bool(pending))
            bar.update()
    bar.close()
    wall = time.time() - t0
    if done:
        env["reruns"][-1]["wall_s"] = round(wall, 1)
        wall += prior.get("wall_s", 0.0)
    else:
        env["commit_end"] = git_commit()
    write_reports(out, list(results.values()), env, not_run, args.time_budget, wall)
    c = counts(list(results.values()))
    print(f"{len(results)} {what} in {wall / 60:.1f} min: " + ", ".join(f"{s} {n}" for s, n in c.items()))
    if not_run:
        print(f"not run: {', '.join(not_run)}")
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
