"""LightningModules: multitask translation with the encoder-decoder, language modelling with the GPT."""

from lightning_moe.modules.causal_lm import CausalLMModule
from lightning_moe.modules.language_model import LanguageModelModule
from lightning_moe.modules.losses import label_smoothed_nll
from lightning_moe.modules.optim import adamw_with_schedule, lr_multiplier
from lightning_moe.modules.translation import MultitaskTranslationModule

__all__ = [
    "CausalLMModule",
    "LanguageModelModule",
    "MultitaskTranslationModule",
    "adamw_with_schedule",
    "label_smoothed_nll",
    "lr_multiplier",
]
