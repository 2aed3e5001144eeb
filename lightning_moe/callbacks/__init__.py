"""Callbacks and metrics for monitoring MoE training."""

from lightning_moe.callbacks.expert_bias import ExpertBiasUpdate
from lightning_moe.callbacks.load_balance import LoadBalanceMonitor, LoadImbalanceWarning
from lightning_moe.callbacks.metrics import LOAD_STATISTICS, ExpertLoadMetric, expert_load_statistics
from lightning_moe.callbacks.non_finite import NonFiniteError, NonFiniteGuard

__all__ = [
    "LOAD_STATISTICS",
    "ExpertBiasUpdate",
    "ExpertLoadMetric",
    "LoadBalanceMonitor",
    "LoadImbalanceWarning",
    "NonFiniteError",
    "NonFiniteGuard",
    "expert_load_statistics",
]
