"""Triton kernels for the MoE layer (fused router, gather/scatter-fused grouped GEMMs).

Until the fused kernels land, :func:`triton_available` reports False and ``MoE(backend="triton")``
falls back to the torch path with a warning.
"""

from __future__ import annotations

import warnings

import torch


def triton_available(device: torch.device, warn: bool = False) -> bool:
    """Whether the Triton kernels can run on ``device``.

    Args:
        device: the device the layer runs on.
        warn: emit a warning naming the reason when they cannot.
    """
    if warn:
        warnings.warn(
            f"MoE(backend='triton'): fused Triton kernels are not available on {device}; using the torch backend",
            stacklevel=3,
        )
    return False
