"""Batch-invariant kernels, one per file, each a ``torch.library`` custom op in the ``detcompile``
namespace with a fake (meta) implementation, a Triton implementation for CUDA and a CPU one.

Importing this package registers every op under ``torch.ops.detcompile``.

Shared pieces that register no op: ``_common`` (checks, device facts), ``_cpu`` (CPU GEMM tiles and
fixed-order sums), ``_trees`` (Triton pairwise trees) and ``row_kernels`` (the tiling and split-row
schedules of rms_norm, layer_norm and softmax).
"""
from . import _common  # noqa: F401
from . import matmul  # noqa: F401
from . import linear_group  # noqa: F401
from . import rms_norm  # noqa: F401
from . import layer_norm  # noqa: F401
from . import group_norm  # noqa: F401
from . import softmax  # noqa: F401
from . import reduce  # noqa: F401
from . import cumsum  # noqa: F401
from . import index_add  # noqa: F401
from . import scatter_add  # noqa: F401
from . import attention  # noqa: F401
from . import paged_attention  # noqa: F401
from . import kv_cache_write  # noqa: F401
from . import grouped_mm  # noqa: F401
from . import cpu_pointwise  # noqa: F401
from . import conv1d  # noqa: F401
from . import solve_triangular  # noqa: F401
from . import rotary_embedding  # noqa: F401
from . import silu_mul  # noqa: F401
from . import linear_swiglu  # noqa: F401
