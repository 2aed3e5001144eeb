"""MoE transformers: the M3 encoder-decoder, the GPT language model, the decoder of the published MoE families."""

from lightning_moe.models.config import GPTConfig, TransformerConfig
from lightning_moe.models.decoder import MoEDecoder
from lightning_moe.models.decoder_config import DecoderConfig
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
    "DecoderConfig",
    "EncoderDecoderTransformer",
    "FeedForward",
    "GPTConfig",
    "KVCache",
    "LayerCache",
    "MoEDecoder",
    "TransformerBlock",
    "TransformerConfig",
    "beam_search",
    "greedy_search",
]
