"""Transformer building blocks: attention with a KV cache, dense FFN, and a pre-LN block whose FFN is dense or MoE.

Legend: B batch, T query positions, S key positions, D model width, N heads, Hd head width (D / N).

Padding masks are bool with True marking a padding token (the MoE convention). Causal blocks
never mask padding keys: sequences are right-padded, so a causal query never sees a padding key
that follows it; their padding mask only keeps padding tokens out of MoE routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.models.config import _ModelConfig
from lightning_moe.moe import MoE


@dataclass
class KVCache:
    """Keys and values of one attention layer, ``[B, N, S, Hd]`` each, ``None`` until first filled."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached key positions."""
        return 0 if self.k is None else self.k.shape[2]


@dataclass
class LayerCache:
    """Caches of one decoder block: its growing self-attention and its fixed cross-attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


@dataclass
class DecoderCache:
    """Per-block caches of a decoder stack for incremental decoding.

    Pass the same cache to successive ``decode`` calls with only the new tokens. Self-attention
    keys and values grow by the new positions at every call; cross-attention keys and values are
    computed from the encoder memory on the first call and reused.
    """

    layers: list[LayerCache]

    @property
    def length(self) -> int:
        """Target positions already decoded (the position of the next token)."""
        return self.layers[0].self_attn.length if self.layers else 0

    def reorder(self, index_B: Tensor) -> None:
        """Keep batch rows ``index_B`` of the self-attention caches (beam search reordering).

        Cross-attention entries are left alone: beam search only reorders rows among the beams
        of one source sentence, which share the same cross-attention keys and values.
        """
        for layer in self.layers:
            cache = layer.self_attn
            if cache.k is not None and cache.v is not None:
                cache.k = cache.k.index_select(0, index_B)
                cache.v = cache.v.index_select(0, index_B)


class Attention(nn.Module):
    """Multi-head attention (self- or cross-) with an optional KV cache.

    Args:
        d_model: D.
        n_heads: N; must divide ``d_model``.
        dropout: dropout on attention probabilities (training only).
        causal: mask future positions (decoder self-attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x_BTD: Tensor) -> Tensor:
        B, T, _ = x_BTD.shape
        return x_BTD.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x_BTD: Tensor,
        memory_BSD: Tensor | None = None,
        key_padding_mask_BS: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` to itself (``memory_BSD=None``) or to ``memory_BSD``.

        Args:
            x_BTD: queries (and keys/values in self-attention).
            memory_BSD: keys/values of cross-attention; ignored once ``cache`` holds them.
            key_padding_mask_BS: True marks key positions to ignore.
            cache: self-attention: new keys/values are appended; cross-attention: keys/values are
                computed once and reused.

        Returns:
            ``[B, T, D]``.
        """
        B, T, _ = x_BTD.shape
        q_BNTd = self._heads(self.q_proj(x_BTD))
        if memory_BSD is None:
            k_BNSd, v_BNSd = self._heads(self.k_proj(x_BTD)), self._heads(self.v_proj(x_BTD))
            if cache is not None:
                if cache.k is not None and cache.v is not None:
                    k_BNSd = torch.cat([cache.k, k_BNSd], dim=2)
                    v_BNSd = torch.cat([cache.v, v_BNSd], dim=2)
                cache.k, cache.v = k_BNSd, v_BNSd
        elif cache is not None and cache.k is not None and cache.v is not None:
            k_BNSd, v_BNSd = cache.k, cache.v
        else:
            k_BNSd, v_BNSd = self._heads(self.k_proj(memory_BSD)), self._heads(self.v_proj(memory_BSD))
            if cache is not None:
                cache.k, cache.v = k_BNSd, v_BNSd
        S = k_BNSd.shape[2]

        is_causal = self.causal and key_padding_mask_BS is None and T == S
        mask = None
        if not is_causal:
            mask = self._mask(T, S, key_padding_mask_BS, x_BTD.device)
        y_BNTd = F.scaled_dot_product_attention(
            q_BNTd, k_BNSd, v_BNSd, attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
        )  # fmt: skip
        return self.out_proj(y_BNTd.transpose(1, 2).reshape(B, T, -1))  # -1: the local heads under TP

    def _mask(self, T: int, S: int, key_padding_mask_BS: Tensor | None, device: torch.device) -> Tensor | None:
        """Bool ``[B or 1, 1, T, S]`` mask, True = may attend; ``None`` when nothing is masked."""
        mask = None
        if self.causal:
            # The T queries are the last T of the S positions (earlier ones are cached).
            mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)[None, None]
        if key_padding_mask_BS is not None:
            keep = ~key_padding_mask_BS[:, None, None, :]
            mask = keep if mask is None else mask & keep
        return mask


class FeedForward(nn.Module):
    """Bias-free dense FFN, the same function as one MoE expert.

    Args:
        d_model: D.
        d_ff: hidden width F.
        activation: ``"swiglu"`` (``w2(silu(w1 x) * w3 x)``), ``"gelu"`` or ``"relu"`` (``w2(act(w1 x))``).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Apply the FFN to ``x [..., D]``; ``padding_mask`` is accepted for symmetry with MoE and unused."""
        h = self.w1(x)
        if self.w3 is not None:
            h = F.silu(h) * self.w3(x)
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return self.w2(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, then a dense or MoE FFN.

    ``x = x + attn(ln(x)); x = x + cross_attn(ln(x), memory); x = x + ffn(ln(x))``, with dropout
    on each residual branch.

    Args:
        config: width, heads, dropout, activation and MoE settings.
        causal: causal self-attention (decoder) or bidirectional (encoder).
        cross_attention: add a cross-attention sub-layer over an encoder memory.
        moe: the FFN is a :class:`~lightning_moe.moe.MoE` layer instead of a dense FFN.
    """

    def __init__(self, config: _ModelConfig, *, causal: bool, cross_attention: bool, moe: bool) -> None:
        super().__init__()
        D = config.d_model
        self.norm_attn = nn.LayerNorm(D)
        self.attn = Attention(D, config.n_heads, config.dropout, causal=causal)
        self.norm_cross = nn.LayerNorm(D) if cross_attention else None
        self.cross_attn = Attention(D, config.n_heads, config.dropout, causal=False) if cross_attention else None
        self.norm_ffn = nn.LayerNorm(D)
        self.ffn: MoE | FeedForward = (
            MoE(**config.moe_kwargs()) if moe else FeedForward(D, config.d_ff, config.activation)
        )
        self.dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        """Whether this block's FFN is an MoE layer."""
        return isinstance(self.ffn, MoE)

    def forward(
        self,
        x_BTD: Tensor,
        padding_mask_BT: Tensor | None = None,
        memory_BSD: Tensor | None = None,
        memory_padding_mask_BS: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Apply the block.

        Args:
            x_BTD: input.
            padding_mask_BT: True marks padding tokens; kept out of MoE routing, and masked as
                attention keys in non-causal blocks.
            memory_BSD: encoder output, for blocks with cross-attention.
            memory_padding_mask_BS: True marks padding positions of the memory.
            cache: the block's KV caches for incremental decoding.

        Returns:
            ``[B, T, D]``.
        """
        key_padding = None if self.attn.causal else padding_mask_BT
        self_cache = None if cache is None else cache.self_attn
        h = self.attn(self.norm_attn(x_BTD), key_padding_mask_BS=key_padding, cache=self_cache)
        x_BTD = x_BTD + self.dropout(h)
        if self.cross_attn is not None and self.norm_cross is not None:
            h = self.cross_attn(
                self.norm_cross(x_BTD), memory_BSD, key_padding_mask_BS=memory_padding_mask_BS,
                cache=None if cache is None else cache.cross_attn,
            )  # fmt: skip
            x_BTD = x_BTD + self.dropout(h)
        h = self.ffn(self.norm_ffn(x_BTD), padding_mask=padding_mask_BT)
        return x_BTD + self.dropout(h)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position encodings (Vaswani et al. 2017), ``[max_positions, D]`` buffer."""

    def __init__(self, max_positions: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.empty(max_positions, d_model), persistent=False)
        self.max_positions = max_positions
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the table, e.g. after ``to_empty`` from the meta device."""
        max_positions, d_model = self.table.shape
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_positions, d_model)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.table.copy_(table)

    def forward(self, start: int, length: int) -> Tensor:
        """Encodings of positions ``[start, start + length)``, ``[length, D]``."""
        _check_positions(start, length, self.max_positions)
        return self.table[start : start + length]


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings, ``[max_positions, D]``."""

    def __init__(self, max_positions: int, d_model: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        self.std = std
        self.max_positions = max_positions
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``N(0, std)``."""
        nn.init.normal_(self.weight, std=self.std)

    def forward(self, start: int, length: int) -> Tensor:
        """Embeddings of positions ``[start, start + length)``, ``[length, D]``."""
        _check_positions(start, length, self.max_positions)
        return self.weight[start : start + length]


def make_positions(config: _ModelConfig, std: float) -> SinusoidalPositions | LearnedPositions:
    """The position module ``config.positions`` asks for (``std``: init scale of learned ones)."""
    if config.positions == "learned":
        return LearnedPositions(config.max_positions, config.d_model, std)
    return SinusoidalPositions(config.max_positions, config.d_model)


def _check_positions(start: int, length: int, max_positions: int) -> None:
    if start + length > max_positions:
        raise ValueError(
            f"sequence reaches position {start + length} but max_positions={max_positions}; shorten the "
            f"sequence or build the model with max_positions >= {start + length}"
        )


__all__ = [
    "Attention",
    "DecoderCache",
    "FeedForward",
    "KVCache",
    "LayerCache",
    "LearnedPositions",
    "SinusoidalPositions",
    "TransformerBlock",
    "make_positions",
]
