"""Model surgery on trained checkpoints: expert pruning and expert aggregation (Kim et al. 2021), dense -> MoE upcycling."""

from lightning_moe.surgery.aggregate import aggregate_checkpoints, aggregate_experts
from lightning_moe.surgery.checkpoints import SurgeryError, load_checkpoint_dict, save_checkpoint_dict
from lightning_moe.surgery.prune import prune_checkpoint, prune_experts, select_experts
from lightning_moe.surgery.upcycle import upcycle, upcycle_ffn, upcycled_config
from lightning_moe.surgery.usage import count_expert_usage, translation_usage

__all__ = [
    "SurgeryError",
    "aggregate_checkpoints",
    "aggregate_experts",
    "count_expert_usage",
    "load_checkpoint_dict",
    "prune_checkpoint",
    "prune_experts",
    "save_checkpoint_dict",
    "select_experts",
    "translation_usage",
    "upcycle",
    "upcycle_ffn",
    "upcycled_config",
]
