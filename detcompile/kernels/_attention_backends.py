"""What the engine's optional attention backends (``attention_fa3``, ``attention_flashinfer``) share:
their error type, the device check and the window convention. Imports neither package."""
from __future__ import annotations

import torch


class BackendUnavailableError(RuntimeError):
    """An attention backend that was asked for cannot run here (package missing, GPU or model
    feature unsupported). Raised when the engine is built, before anything is compiled."""


class BackendNotInstalledError(BackendUnavailableError, ImportError):
    """The backend's package is not installed (also an ImportError)."""


def require_cuda(backend: str, device: torch.device, *, min_cc: tuple[int, int], max_cc: tuple[int, int] | None = None,
                 why: str) -> None:
    """Refuse a device the backend's kernels do not run on, naming why."""
    if device.type != "cuda":
        raise BackendUnavailableError(f"detcompile: attention_backend={backend!r} needs a CUDA GPU ({why}); the "
                                      f"model is on {device.type!r}. Use attention_backend='triton' (the default).")
    cc = torch.cuda.get_device_capability(device)
    if cc < min_cc or (max_cc is not None and cc > max_cc):
        name = torch.cuda.get_device_name(device)
        raise BackendUnavailableError(f"detcompile: attention_backend={backend!r} does not support {name} (compute "
                                      f"capability {cc[0]}.{cc[1]}): {why}. Use attention_backend='triton'.")


def effective_window(window: int, max_model_len: int) -> int:
    """The sliding window the kernel must apply: 0 (none) when no query of the engine can have a
    key outside it (query p sees keys p - window < k <= p, and p < max_model_len), so a
    model's nominal window wider than the context is exactly no window."""
    return 0 if window <= 0 or window >= max_model_len else window
