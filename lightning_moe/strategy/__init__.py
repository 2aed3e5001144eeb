"""Expert parallelism for Lightning: the strategy, its mesh and placement, parallelize, checkpoints, memory."""

from lightning_moe.strategy.checkpoint import (
    CheckpointError,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    read_full_checkpoint,
)
from lightning_moe.strategy.expert_parallel import (
    STRATEGY_NAME,
    ExpertParallelStrategy,
    register_expert_parallel_strategy,
)
from lightning_moe.strategy.grads import clip_grad_norm_, expert_parameters, grad_norm
from lightning_moe.strategy.mesh import PLACEMENTS, ParallelDims, default_expert_parallel_size
from lightning_moe.strategy.parallelize import ParallelizeConfig

__all__ = [
    "PLACEMENTS",
    "STRATEGY_NAME",
    "CheckpointError",
    "ExpertParallelStrategy",
    "ParallelDims",
    "ParallelizeConfig",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "default_expert_parallel_size",
    "expert_parameters",
    "grad_norm",
    "is_sharded_checkpoint",
    "read_full_checkpoint",
    "register_expert_parallel_strategy",
]
