"""The MoE layer: router, dispatcher, grouped experts."""

from lightning_moe.moe.balancing import balanced_routers, update_expert_biases
from lightning_moe.moe.dispatch import ExpertParallelGroup, TokenDispatcher
from lightning_moe.moe.experts import GroupedExperts, grouped_mm
from lightning_moe.moe.layer import MoE, MoEStats, moe_layers
from lightning_moe.moe.router import Router, RoutingResult, compute_capacity

__all__ = [
    "ExpertParallelGroup",
    "GroupedExperts",
    "MoE",
    "MoEStats",
    "Router",
    "RoutingResult",
    "TokenDispatcher",
    "balanced_routers",
    "compute_capacity",
    "grouped_mm",
    "moe_layers",
    "update_expert_biases",
]
