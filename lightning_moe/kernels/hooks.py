"""What ``MoE(backend="triton")`` calls: fused routing and the fused expert FFN + combine.

Legend: T tokens, H hidden, E experts, L local experts, K top-k, P = T * K pairs.

Triton is imported only inside these functions, so ``import lightning_moe`` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_moe.kernels.availability import unavailable_reason
from lightning_moe.moe.router import RoutingResult

if TYPE_CHECKING:
    from lightning_moe.moe.layer import MoE
    from lightning_moe.moe.router import Router


def triton_route(router: Router, x_TH: Tensor, padding_mask_T: Tensor | None = None) -> RoutingResult:
    """Route with the fused router kernels (same semantics and fields as ``router(x_TH, mask)``).

    Falls back to the torch router where the kernels cannot run (e.g. float64 inputs) and for
    the routing options the fused kernels do not implement (``router.fused_supported`` is False:
    sigmoid scores, a correction bias, group-limited top-k, non-default renormalisation or a
    scaling factor). This is the one place that decides it; the expert kernels then consume the
    torch routing as they would the fused one.

    Args:
        router: the layer's router (weight, top-k, capacity settings, training mode).
        x_TH: ``[T, H]`` tokens.
        padding_mask_T: optional ``[T]`` bool, True marks padding.

    Returns:
        A :class:`~lightning_moe.kernels.router.TritonRoutingResult` (a :class:`RoutingResult`
        that also carries the expert-sorted permutation), or the torch router's result.
    """
    if not router.fused_supported or unavailable_reason(x_TH.device, x_TH.dtype) is not None or x_TH.shape[0] == 0:
        return router.route_reference(x_TH, padding_mask_T)
    from lightning_moe.kernels.router import fused_route

    with torch.autocast(device_type=x_TH.device.type, enabled=False):
        return fused_route(
            x_TH,
            router.weight,
            router.top_k,
            router.active_capacity_factor(),
            router.min_capacity,
            padding_mask_T,
            random_priority=router.random_token_selection and router.training,
            jitter=router.router_jitter if router.training else 0.0,
        )


def expert_sorted_pairs(expert_indices_TK: Tensor, kept_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Torch reference of the dispatch order: ``(row_pair_P int32, counts_E int32)``.

    Kept pairs sorted stably by expert (token order inside an expert); entries past the number of
    kept pairs are unused.
    """
    T, K = expert_indices_TK.shape
    pair_kept = torch.nonzero(kept_TK.reshape(-1), as_tuple=True)[0]
    experts_kept = expert_indices_TK.reshape(-1)[pair_kept]
    order = torch.argsort(experts_kept, stable=True)
    row_pair_P = torch.zeros(T * K, dtype=torch.int32, device=kept_TK.device)
    row_pair_P[: pair_kept.numel()] = pair_kept[order].to(torch.int32)
    counts_E = torch.bincount(experts_kept, minlength=num_experts).to(torch.int32)
    return row_pair_P, counts_E


def triton_moe_experts(moe: MoE, x_TH: Tensor, routing: RoutingResult) -> tuple[Tensor, Tensor]:
    """Experts and combine of a MoE layer as ``MoE.forward`` runs them (the Triton path where it can).

    Without expert parallelism the token gather, the slot scatter and the weighted combine are
    fused into the kernels (:meth:`~lightning_moe.moe.GroupedExperts.fused_forward`). Under expert
    parallelism the dispatcher's all-to-all moves the rows and the grouped GEMMs run on the
    received, expert-contiguous rows. Where the kernels cannot run (e.g. float64) this is the
    reference path.

    Args:
        moe: the layer.
        x_TH: ``[T, H]`` tokens in the compute dtype.
        routing: the routing of these tokens.

    Returns:
        ``(y_TH, kept_per_expert_E)``: the combined output and this rank's kept pairs per global expert.
    """
    return moe._experts_step(x_TH, routing)
