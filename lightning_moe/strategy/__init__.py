"""Expert parallelism for Lightning: the strategy, its mesh, gradient rule and checkpoints."""

from lightning_moe.strategy.checkpoint import CheckpointError, consolidate_checkpoint, load_checkpoint
from lightning_moe.strategy.expert_parallel import (
    STRATEGY_NAME,
    ExpertParallelStrategy,
    register_expert_parallel_strategy,
)
from lightning_moe.strategy.grads import clip_grad_norm_, expert_parameters
from lightning_moe.strategy.mesh import (
    ExpertParallelGroups,
    ExpertParallelMesh,
    build_process_groups,
    default_expert_parallel_size,
)

__all__ = [
    "STRATEGY_NAME",
    "CheckpointError",
    "ExpertParallelGroups",
    "ExpertParallelMesh",
    "ExpertParallelStrategy",
    "build_process_groups",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "default_expert_parallel_size",
    "expert_parameters",
    "load_checkpoint",
    "register_expert_parallel_strategy",
]
