"""Loading of the compiled extension `longtrain.kernels._C`, and the `csrc` backend's support check.

The extension registers the custom ops `torch.ops.longtrain.*` (see csrc/ops.cpp). When it is
missing or fails to load, the `csrc` backend reports itself unavailable, `auto` dispatch moves on
to the next backend, and one RuntimeWarning says why. Importing longtrain never fails for it.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_state: dict = {}

CSRC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def extension():
    """The module longtrain.kernels._C, or None when it cannot be loaded (warns once)."""
    if "module" not in _state:
        try:
            _state["module"], _state["error"] = importlib.import_module("longtrain.kernels._C"), None
        except Exception as error:  # ImportError, or OSError from a stale build against another torch
            _state["module"], _state["error"] = None, f"{type(error).__name__}: {error}"
            warnings.warn(
                f"longtrain.kernels._C could not be loaded ({_state['error']}); kernels fall back to the torch "
                "and reference backends. Rebuild it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning, stacklevel=3)
    return _state["module"]


def csrc_supports(device: torch.device, dtype: torch.dtype, **_) -> str | None:
    """None when our compiled kernels serve this device and dtype, else the reason they do not."""
    module = extension()
    if module is None:
        return f"extension longtrain.kernels._C not loaded ({_state['error']})"
    if device.type == "cuda" and not module.with_cuda:
        return "extension built without CUDA"
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device {device.type}"
    if dtype not in CSRC_DTYPES:
        return f"dtype {dtype} not supported (float32, bfloat16, float16)"
    return None
