"""Callbacks and metrics for monitoring MoE training."""

from lightning_moe.callbacks.expert_bias import ExpertBiasUpdate
from lightning_moe.callbacks.load_balance import LoadBalanceMonitor, LoadImbalanceWarning
from lightning_moe.callbacks.metrics import LOAD_STATISTICS, ExpertLoadMetric, expert_load_statistics

__all__ = [
    "LOAD_STATISTICS",
    "ExpertBiasUpdate",
    "ExpertLoadMetric",
    "LoadBalanceMonitor",
    "LoadImbalanceWarning",
    "expert_load_statistics",
]
