"""Encoder-decoder MoE transformer for multitask multilingual translation (Kim et al. 2021, Z-code M3).

Legend: B batch, S source positions, T target positions, D model width, V vocabulary.

Pre-LN encoder and decoder; one token embedding shared by source, target and the output
projection, scaled by ``sqrt(D)``; sinusoidal or learned positions; every other FFN an MoE layer
by default. Incremental decoding keeps a :class:`~lightning_moe.models.transformer.DecoderCache`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_moe.models.config import TransformerConfig
from lightning_moe.models.transformer import DecoderCache, LayerCache, TransformerBlock, make_positions
from lightning_moe.moe import MoE


class EncoderDecoderTransformer(nn.Module):
    """Pre-LN encoder-decoder transformer with MoE FFN layers.

    Args:
        config: the :class:`~lightning_moe.models.TransformerConfig`.

    Example:
        >>> cfg = TransformerConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64,
        ...                         n_encoder_layers=2, n_decoder_layers=2, num_experts=4)
        >>> model = EncoderDecoderTransformer(cfg)
        >>> model(torch.randint(100, (2, 7)), torch.randint(100, (2, 5))).shape
        torch.Size([2, 5, 100])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.embed = nn.Embedding(config.vocab_size, D)
        self.embed_scale = math.sqrt(D)
        self.encoder_positions = make_positions(config, std=D**-0.5)
        self.decoder_positions = make_positions(config, std=D**-0.5)
        self.dropout = nn.Dropout(config.dropout)
        enc_moe, dec_moe = set(config.encoder_moe_indices()), set(config.decoder_moe_indices())
        self.encoder = nn.ModuleList(
            TransformerBlock(config, causal=False, cross_attention=False, moe=i in enc_moe)
            for i in range(config.n_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(D)
        self.decoder = nn.ModuleList(
            TransformerBlock(config, causal=True, cross_attention=True, moe=i in dec_moe)
            for i in range(config.n_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Transformer-base init: embeddings ``N(0, D^-1/2)``, Xavier-uniform linear layers, zero biases.

        MoE layers keep their own initialisation.
        """
        nn.init.normal_(self.embed.weight, std=self.config.d_model**-0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _embed(self, ids_BT: Tensor, positions: nn.Module, start: int) -> Tensor:
        x_BTD = self.embed(ids_BT) * self.embed_scale + positions(start, ids_BT.shape[1])
        return self.dropout(x_BTD)

    def encode(self, src_ids_BS: Tensor, src_padding_mask_BS: Tensor | None = None) -> Tensor:
        """Encode source tokens.

        Args:
            src_ids_BS: source token ids.
            src_padding_mask_BS: True marks padding positions (masked in attention, not routed).

        Returns:
            The encoder memory ``[B, S, D]``.
        """
        x_BSD = self._embed(src_ids_BS, self.encoder_positions, 0)
        for block in self.encoder:
            x_BSD = block(x_BSD, padding_mask_BT=src_padding_mask_BS)
        return self.encoder_norm(x_BSD)

    def decode(
        self,
        tgt_ids_BT: Tensor,
        memory_BSD: Tensor,
        memory_padding_mask_BS: Tensor | None = None,
        tgt_padding_mask_BT: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Decode target tokens against an encoder memory.

        Args:
            tgt_ids_BT: target input ids; with a ``cache``, only the tokens after those already cached.
            memory_BSD: output of :meth:`encode`.
            memory_padding_mask_BS: True marks source padding.
            tgt_padding_mask_BT: True marks target padding (kept out of MoE routing).
            cache: a :meth:`new_cache` cache, filled and extended in place.

        Returns:
            Logits ``[B, T, V]`` (the output projection is the tied embedding).
        """
        start = 0 if cache is None else cache.length
        x_BTD = self._embed(tgt_ids_BT, self.decoder_positions, start)
        for i, block in enumerate(self.decoder):
            x_BTD = block(
                x_BTD, padding_mask_BT=tgt_padding_mask_BT, memory_BSD=memory_BSD,
                memory_padding_mask_BS=memory_padding_mask_BS, cache=None if cache is None else cache.layers[i],
            )  # fmt: skip
        return self.decoder_norm(x_BTD) @ self.embed.weight.t()

    def forward(
        self,
        src_ids_BS: Tensor,
        tgt_ids_BT: Tensor,
        src_padding_mask_BS: Tensor | None = None,
        tgt_padding_mask_BT: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced forward pass.

        Args:
            src_ids_BS: source ids.
            tgt_ids_BT: target input ids (shifted right, starting with BOS).
            src_padding_mask_BS: True marks source padding.
            tgt_padding_mask_BT: True marks target padding.

        Returns:
            Logits ``[B, T, V]``.
        """
        memory_BSD = self.encode(src_ids_BS, src_padding_mask_BS)
        return self.decode(tgt_ids_BT, memory_BSD, src_padding_mask_BS, tgt_padding_mask_BT)

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental decoding with :meth:`decode`."""
        return DecoderCache([LayerCache() for _ in self.decoder])

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE layers, encoder first, in layer order."""
        return (m for m in self.modules() if isinstance(m, MoE))

    def moe_aux_loss(self) -> Tensor:
        """Sum of the weighted aux losses (load balance + z-loss) of every MoE layer's last forward.

        Returns:
            A differentiable scalar; zero for a dense model or before any forward.
        """
        total = torch.zeros((), device=self.embed.weight.device)
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                total = total + moe.aux_loss
        return total


__all__ = ["EncoderDecoderTransformer"]
