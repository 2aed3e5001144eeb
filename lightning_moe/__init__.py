"""lightning_moe: Mixture-of-Experts training for PyTorch Lightning."""

from lightning_moe.callbacks import LoadBalanceMonitor, NonFiniteGuard
from lightning_moe.models import (
    GPT,
    EncoderDecoderTransformer,
    GPTConfig,
    TransformerConfig,
    beam_search,
    greedy_search,
)
from lightning_moe.modules import LanguageModelModule, MultitaskTranslationModule
from lightning_moe.moe import MoE, MoEStats
from lightning_moe.strategy import ExpertParallelStrategy, consolidate_checkpoint  # registers "expert_parallel"

__all__ = [
    "GPT",
    "EncoderDecoderTransformer",
    "ExpertParallelStrategy",
    "GPTConfig",
    "LanguageModelModule",
    "LoadBalanceMonitor",
    "MoE",
    "MoEStats",
    "MultitaskTranslationModule",
    "NonFiniteGuard",
    "TransformerConfig",
    "beam_search",
    "consolidate_checkpoint",
    "greedy_search",
]
__version__ = "0.1.0.dev0"
