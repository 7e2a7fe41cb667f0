"""What runs outside the backend: Dynamo graph breaks and recompile-limit fallbacks.

Dynamo calls a backend once per graph it captures. Two kinds of code never reach it and run eagerly,
with the stock (batch-variant) kernels:

* at a **graph break** the call Dynamo cannot trace (a ``torch._dynamo.disable``d helper, a function in
  a skipped file, a data-dependent ``.item()``...) runs in plain Python between two graphs;
* once a frame has been compiled ``torch._dynamo.config.recompile_limit`` times, Dynamo runs it
  **eagerly from then on** without calling any backend.

The backend learns of a graph break from the graphs around it: the graph compiled before the break
carries ``gm.compile_subgraph_reason.graph_break`` (with the reason and the user stack), and the code
after it is compiled as a ``torch_dynamo_resume_in_<fn>_at_<line>`` function. Either one is turned into
a leftover of the graph's report, so strict mode raises and the default mode warns through the usual
path. A recompile-limit fallback calls no backend at all, so strict mode turns on Dynamo's own
``fail_on_recompile_limit_hit`` (process-wide: Dynamo checks the limit before any backend runs), and
the default mode watches Dynamo's log record of the event and turns it into a warning naming the
function. See docs/design.md ("Code that runs outside the backend").
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx

from .passes.manager import Leftover

#: Dynamo names the function that continues a frame after a graph break with this prefix.
RESUME_PREFIX = "torch_dynamo_resume_in_"
#: The logger of Dynamo's frame conversion, which reports recompile-limit fallbacks.
CONVERT_FRAME_LOGGER = "torch._dynamo.convert_frame"

# "'fn' (file:line)" of every frame the deterministic backend compiled (Dynamo's own format in the
# recompile-limit message), and the functions already warned about.
_compiled_frames: set[str] = set()
_warned: set[tuple] = set()
_handler: logging.Handler | None = None


def _root_code():
    """The code object of the frame Dynamo is compiling, or None where this torch has no such hook."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return getattr(tx, "f_code", None)
    except Exception:  # an internal hook: absent or renamed on other torch versions
        return None


def _frame_key(code) -> str:
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def graph_breaks(gm: fx.GraphModule) -> list[Leftover]:
    """Leftovers for the graph breaks this Dynamo graph borders (empty if it is a whole frame)."""
    out: list[Leftover] = []
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        stack = list(getattr(reason, "user_stack", None) or [])
        where = ""
        if stack:
            f = stack[-1]
            where = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
        what = str(getattr(reason, "reason", "")).strip().splitlines()
        out.append(Leftover(
            "graph break",
            f"Dynamo stopped the graph here ({what[0] if what else 'no reason given'}): the call it could not "
            "trace runs eagerly with stock kernels, outside the backend",
            where,
        ))
    code = _root_code()
    if code is not None:
        _compiled_frames.add(_frame_key(code))
        if code.co_name.startswith(RESUME_PREFIX):
            out.append(Leftover(
                "graph break",
                f"this graph resumes a frame after a graph break ({code.co_name}): the call at the break "
                "ran eagerly with stock kernels, outside the backend",
                f"{code.co_filename}:{code.co_firstlineno}",
            ))
    return out


class _RecompileLimitWatch(logging.Handler):
    """Turns Dynamo's "hit config.recompile_limit" log record into one loud warning per function."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if "hit config." not in msg or "limit" not in msg:
            return
        func = next((ln.split("function:", 1)[1].strip() for ln in msg.splitlines() if "function:" in ln), "?")
        # Only frames this backend compiled; if none could be recorded, every fallback is suspect.
        if _compiled_frames and func not in _compiled_frames:
            return
        dyn = torch._dynamo.config
        raising = bool(getattr(dyn, "fail_on_recompile_limit_hit", getattr(dyn, "fail_on_cache_limit_hit", False)))
        if (func, raising) in _warned:
            return
        _warned.add((func, raising))
        limit = msg.splitlines()[0].replace("torch._dynamo ", "").strip()
        if raising:
            then = ("Dynamo raises FailOnRecompileLimitHit (detcompile's strict mode turned on "
                    "torch._dynamo.config.fail_on_recompile_limit_hit) instead of running it eagerly")
        else:
            then = ("from now on it runs EAGERLY with stock kernels, outside the deterministic backend, so its "
                    "outputs can depend on the batch; options={'strict': True} makes this an error")
        warnings.warn(
            f"detcompile: Dynamo {limit} for function {func}: {then}. "
            "TORCH_LOGS=recompiles shows what it recompiles on.",
            UserWarning,
            stacklevel=2,
        )


def watch_recompile_limit(strict: bool) -> None:
    """Make a recompile-limit fallback loud: an error under strict, else a warning (process-wide)."""
    global _handler
    dyn = torch._dynamo.config
    if strict:
        if getattr(dyn, "suppress_errors", False):
            warnings.warn(
                "detcompile (strict): torch._dynamo.config.suppress_errors is on, so Dynamo swallows every "
                "error, strict mode's included, and falls back to eager: strict cannot hold",
                UserWarning,
                stacklevel=3,
            )
        else:
            # The flag's older name first had "cache" for "recompile".
            flag = next((f for f in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(dyn, f)), None)
            if flag is not None:
                setattr(dyn, flag, True)
            elif ("no fail flag", True) not in _warned:
                _warned.add(("no fail flag", True))
                warnings.warn(
                    "detcompile (strict): this torch has no fail_on_recompile_limit_hit, so a frame past "
                    "Dynamo's recompile limit runs eagerly with a warning instead of an error",
                    UserWarning,
                    stacklevel=3,
                )
    if _handler is None:
        _handler = _RecompileLimitWatch(level=logging.WARNING)
        logging.getLogger(CONVERT_FRAME_LOGGER).addHandler(_handler)
