"""Whether the Triton kernels can run, without importing Triton until it is needed."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton kernels cannot run on ``device`` with ``dtype``, or ``None`` if they can.

    Args:
        device: the device the layer runs on.
        dtype: the compute dtype, if known.
    """
    if not _triton_installed():
        return "triton is not installed (pip install triton, Linux only)"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the kernels (float32, bfloat16, float16)"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return f"{torch.cuda.get_device_name(device)} is older than compute capability 8.0"
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"device {device} is not a CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, for testing)"


def triton_available(device: torch.device, warn: bool = False, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels can run on ``device``.

    Args:
        device: the device the layer runs on.
        warn: emit a warning naming the reason when they cannot (the torch backend runs instead).
        dtype: the compute dtype, if known (float64 has no Triton path).

    Returns:
        True if ``MoE(backend="triton")`` will run the fused kernels.
    """
    reason = unavailable_reason(device, dtype)
    if reason is not None and warn:
        warnings.warn(f"MoE(backend='triton'): {reason}; using the torch backend", stacklevel=3)
    return reason is None
