"""Callbacks and metrics for monitoring MoE training."""

from lightning_moe.callbacks.expert_bias import ExpertBiasUpdate
from lightning_moe.callbacks.load_balance import LoadBalanceMonitor, LoadImbalanceWarning
from lightning_moe.callbacks.metrics import LOAD_STATISTICS, ExpertLoadMetric, expert_load_statistics
from lightning_moe.callbacks.non_finite import NonFiniteError, NonFiniteGuard
from lightning_moe.callbacks.progress import MoEModelSummary, MoEProgressBar
from lightning_moe.callbacks.resume import ExactResume

__all__ = [
    "LOAD_STATISTICS",
    "ExactResume",
    "ExpertBiasUpdate",
    "ExpertLoadMetric",
    "LoadBalanceMonitor",
    "LoadImbalanceWarning",
    "MoEModelSummary",
    "MoEProgressBar",
    "NonFiniteError",
    "NonFiniteGuard",
    "expert_load_statistics",
]
