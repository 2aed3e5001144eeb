"""Triton kernels for the MoE layer: fused router, gather/scatter-fused grouped GEMMs, combine.

Importing this package does not import Triton; the kernel modules (``router``, ``grouped_gemm``,
``combine``, ``moe_ffn``) do, and are imported on first use.
"""

from lightning_moe.kernels.availability import interpreter_enabled, triton_available, unavailable_reason
from lightning_moe.kernels.hooks import expert_sorted_pairs, triton_moe_experts, triton_route

__all__ = [
    "expert_sorted_pairs",
    "interpreter_enabled",
    "triton_available",
    "triton_moe_experts",
    "triton_route",
    "unavailable_reason",
]
