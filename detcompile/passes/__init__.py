"""The FX passes, one per file, in the order they run.

``TORCH_PASSES`` run on the Dynamo graph (before AOTAutograd); ``ATEN_PASSES`` on the aten graph that
AOTAutograd hands to the compiler. The audit runs last and reports whatever is left.
"""
from .cpu_pointwise import cpu_pointwise_pass
from .classify import NondeterminismError, audit_pass, classify
from .convolution import convolution_pass
from .group_norm import group_norm_pass
from .grouped_mm import grouped_mm_pass
from .index_add import index_add_pass
from .layer_norm import layer_norm_pass
from .manager import Leftover, PassContext, PassManager, Report, Rewrite
from .matmul import matmul_pass
from .reductions import reductions_pass
from .rms_norm import rms_norm_pass
from .sdpa import sdpa_pass
from .softmax import softmax_pass
from .solve_triangular import solve_triangular_pass

TORCH_PASSES = [("sdpa", sdpa_pass)]

ATEN_PASSES = [
    ("matmul", matmul_pass),
    ("grouped_mm", grouped_mm_pass),
    ("rms_norm", rms_norm_pass),  # before reductions: it needs to see the written-out mean
    ("layer_norm", layer_norm_pass),
    ("group_norm", group_norm_pass),
    ("softmax", softmax_pass),
    ("reductions", reductions_pass),
    ("index_add", index_add_pass),
    ("convolution", convolution_pass),
    ("solve_triangular", solve_triangular_pass),
    ("cpu_pointwise", cpu_pointwise_pass),  # after the norms/softmax patterns, which read rsqrt/exp
    ("audit", audit_pass),  # always last
]

__all__ = [
    "ATEN_PASSES", "TORCH_PASSES", "Leftover", "NondeterminismError", "PassContext", "PassManager",
    "Report", "Rewrite", "classify",
]
