"""Aux-loss-free load balancing: the per-step update of the routers' correction biases.

Legend: E experts.

A router built with ``expert_bias=True, bias_update_rate > 0`` counts, during training forwards,
the tokens each expert was chosen for. After every optimizer step, :func:`update_expert_biases`
sums those counts over all ranks (one collective for every layer) and moves each bias by
``rate * sign(mean load - load)`` (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing";
DeepSeek-V3). Any training loop can call it; in Lightning, the
:class:`~lightning_moe.callbacks.ExpertBiasUpdate` callback does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_moe.moe.router import Router


def balanced_routers(module: nn.Module) -> list[Router]:
    """The routers inside ``module`` whose correction bias is trained (``bias_update_rate > 0``)."""
    return [
        m for m in module.modules() if isinstance(m, Router) and m.expert_load is not None and m.bias_update_rate > 0
    ]


@torch.no_grad()
def update_expert_biases(module: nn.Module, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> int:
    """Apply one aux-loss-free balancing step to every trained router bias in ``module``.

    Args:
        module: a model (or any module) holding MoE layers.
        all_reduce_sum: sums a tensor over every rank that routes tokens (the data-parallel world,
            expert-parallel ranks included) and returns the sum; ``None`` in a single process.
            Every rank must call this function at the same step.

    Returns:
        The number of routers updated.
    """
    routers = balanced_routers(module)
    if not routers:
        return 0
    loads = [r.expert_load for r in routers]
    assert all(load is not None for load in loads)
    load_RE = torch.cat([load for load in loads if load is not None])
    if all_reduce_sum is not None:
        load_RE = all_reduce_sum(load_RE.clone())
    offset = 0
    for router in routers:
        E = router.num_experts
        router.update_expert_bias(load_RE[offset : offset + E])
        offset += E
    return len(routers)


__all__ = ["balanced_routers", "update_expert_biases"]
