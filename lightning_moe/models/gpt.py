"""Decoder-only MoE language model built from the same blocks as the encoder-decoder.

Legend: B batch, T positions, D model width, V vocabulary.

nanoGPT layout: token + position embeddings, pre-LN causal blocks (every other FFN an MoE layer
by default), final LayerNorm, output projection tied to the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_moe.models.config import GPTConfig
from lightning_moe.models.sampling import generate_tokens
from lightning_moe.models.transformer import DecoderCache, LayerCache, TransformerBlock, make_positions
from lightning_moe.moe import MoE


class GPT(nn.Module):
    """Decoder-only transformer language model with MoE FFN layers.

    Args:
        config: the :class:`~lightning_moe.models.GPTConfig`.

    Example:
        >>> model = GPT(GPTConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2, num_experts=4))
        >>> model(torch.randint(100, (2, 9))).shape
        torch.Size([2, 9, 100])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = make_positions(config, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        moe = set(config.moe_indices())
        self.blocks = nn.ModuleList(
            TransformerBlock(config, causal=True, cross_attention=False, moe=i in moe) for i in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: ``N(0, 0.02)`` weights, residual projections scaled by ``1/sqrt(2 * n_layers)``.

        Biases start at zero; MoE layers keep their own initialisation.
        """
        nn.init.normal_(self.embed.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("out_proj") or name.endswith("ffn.w2")
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self, input_ids_BT: Tensor, padding_mask_BT: Tensor | None = None, cache: DecoderCache | None = None
    ) -> Tensor:
        """Next-token logits.

        Args:
            input_ids_BT: token ids (right-padded); with a ``cache``, only the tokens after those cached.
            padding_mask_BT: True marks padding tokens (kept out of MoE routing).
            cache: a :meth:`new_cache` cache, filled and extended in place.

        Returns:
            Logits ``[B, T, V]``.
        """
        start = 0 if cache is None else cache.length
        x_BTD = self.dropout(self.embed(input_ids_BT) + self.positions(start, input_ids_BT.shape[1]))
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, padding_mask_BT=padding_mask_BT, cache=None if cache is None else cache.layers[i])
        return self.norm(x_BTD) @ self.embed.weight.t()

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental decoding."""
        return DecoderCache([LayerCache() for _ in self.blocks])

    @torch.no_grad()
    def generate(
        self,
        input_ids_BT: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        sync_finished: Callable[[bool], bool] | None = None,
    ) -> Tensor:
        """Continue prompts of equal length with the KV cache.

        Args:
            input_ids_BT: prompts, all of length T (no padding).
            max_new_tokens: tokens to append.
            temperature: softmax temperature; 0 picks the most likely token (greedy).
            top_k: sample only among the ``top_k`` most likely tokens.
            eos_id: stop once every row has produced this token (later positions repeat it).
            sync_finished: under expert parallelism, shares "this process has finished" with the others
                (see :func:`~lightning_moe.models.sampling.generate_tokens`).

        Returns:
            ``[B, T + n]`` ids, prompt included, ``n <= max_new_tokens``.
        """
        return generate_tokens(self, input_ids_BT, max_new_tokens, temperature, top_k, eos_id, sync_finished)

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE layers, in layer order."""
        return (m for m in self.modules() if isinstance(m, MoE))

    def moe_aux_loss(self) -> Tensor:
        """Sum of the weighted aux losses of every MoE layer's last forward (zero for a dense model)."""
        total = torch.zeros((), device=self.embed.weight.device)
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                total = total + moe.aux_loss
        return total


__all__ = ["GPT"]
