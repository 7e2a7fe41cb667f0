"""``detcompile.explain``: what the backend rewrote in a model, what it left, and why."""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from .passes import Report


@dataclasses.dataclass
class ExplainResult:
    reports: list[Report]

    @property
    def rewrites(self):
        return [r for rep in self.reports for r in rep.rewrites]

    @property
    def leftovers(self):
        return [lo for rep in self.reports for lo in rep.leftovers]

    @property
    def ok(self) -> bool:
        """True when every batch-variant op was rewritten."""
        return not self.leftovers

    def __str__(self) -> str:
        head = (
            f"detcompile explain: {len(self.reports)} graph(s), {len(self.rewrites)} op(s) rewritten, "
            f"{len(self.leftovers)} left -> " + ("batch-invariant" if self.ok else "NOT fully batch-invariant")
        )
        body = "\n".join(rep.format() for rep in self.reports)
        versions = self.reports[0].pass_versions if self.reports else {}
        if versions:  # which version of each pass produced these graphs (a hash of its source)
            head += "\npasses: " + " ".join(f"{n}@{v}" for n, v in versions.items())
        tail = "" if self.ok else (
            "\nLeft ops run with their stock kernels (the default fallback); options={'strict': True} makes them errors."
        )
        return f"{head}\n{body}{tail}"


def explain(model, *example_inputs, options: dict | None = None, verbose: bool = True, **example_kwargs) -> ExplainResult:
    """Compile ``model`` with the deterministic backend, run it once on the example inputs without
    gradients, and return (and print, if ``verbose``) a report of every graph: rewritten ops
    (old -> new, with counts) and ops left as they were, with the reason and the model source line.
    """
    from .backend import deterministic_backend

    reports: list[Report] = []
    opts = dict(options or {})
    opts["report_sink"] = reports.append
    opts.setdefault("inductor", False)  # explain inspects graphs; no need to generate code
    backend = functools.partial(deterministic_backend, options=opts)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says it all
        compiled(*example_inputs, **example_kwargs)
    result = ExplainResult(reports)
    if verbose:
        print(result)
    return result
