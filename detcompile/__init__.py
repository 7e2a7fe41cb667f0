"""detcompile: bitwise batch-invariant inference for Hugging Face models.

    model = torch.compile(model, backend="deterministic")

The backend rewrites every batch-variant op (matmuls, norms, softmax and other reductions,
attention, index_add/scatter_add) into the batch-invariant ops of ``detcompile.kernels``.
"""
from . import kernels  # noqa: F401  (registers torch.ops.detcompile.*)
from .kernels._common import UnsupportedError
from .passes.classify import NondeterminismError

__version__ = "0.1.0"

__all__ = ["Engine", "NondeterminismError", "SamplingParams", "UnsupportedError", "__version__", "audit",
           "deterministic_backend", "explain", "generate", "patch_generate"]

_ENGINE_NAMES = {"Engine", "SamplingParams", "RequestOutput", "generate", "patch_generate"}


def __getattr__(name):
    # Lazy: the backend pulls in torch._dynamo, which plain kernel users need not pay for.
    if name == "deterministic_backend":
        from .backend import deterministic_backend

        return deterministic_backend
    if name == "explain":
        from .explainer import explain

        return explain
    if name == "audit":
        # The module is detcompile.divergence: a submodule named "audit" would shadow this function.
        from .divergence import audit

        return audit
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
