"""MoE transformers: the encoder-decoder for multilingual translation, the GPT language model, generation."""

from lightning_moe.models.config import GPTConfig, TransformerConfig
from lightning_moe.models.encoder_decoder import EncoderDecoderTransformer
from lightning_moe.models.generation import beam_search, greedy_search
from lightning_moe.models.gpt import GPT
from lightning_moe.models.transformer import (
    Attention,
    DecoderCache,
    FeedForward,
    KVCache,
    LayerCache,
    TransformerBlock,
)

__all__ = [
    "GPT",
    "Attention",
    "DecoderCache",
    "EncoderDecoderTransformer",
    "FeedForward",
    "GPTConfig",
    "KVCache",
    "LayerCache",
    "TransformerBlock",
    "TransformerConfig",
    "beam_search",
    "greedy_search",
]
