"""The decoder of the published MoE families: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3 (and dense Llama/Qwen3).

Legend: B batch, T query positions, S key positions, D model width, N query heads, Nk key/value
heads, Hd head width, R rotary dimensions, C latent (compressed) width, V vocabulary.

Pre-norm blocks: ``x = x + attn(rmsnorm(x)); x = x + ffn(rmsnorm(x))``, where ``attn`` is
grouped-query attention with rotary positions (optional q/k norms, biases and clipping) or
DeepSeek's multi-head latent attention, and ``ffn`` is a dense SwiGLU
(:class:`~lightning_moe.models.FeedForward`, the function of one expert) or a
:class:`~lightning_moe.moe.MoE` layer (so the Triton kernels, expert parallelism and the router
options apply). Parameter names follow the Hugging Face checkpoints' (``embed_tokens``,
``layers.{i}.self_attn.q_proj``, ``layers.{i}.mlp``, ``norm``, ``lm_head``), which keeps the
adapters in :mod:`lightning_moe.hf` small. Padding masks are bool with True marking a (right-)padding
token: causal queries never see the padding keys after them, and padding stays out of MoE routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.models.decoder_config import DecoderConfig
from lightning_moe.models.rope import apply_rope, rope_cos_sin, rope_frequencies, yarn_mscale
from lightning_moe.models.sampling import generate_tokens
from lightning_moe.models.transformer import DecoderCache, FeedForward, KVCache, LayerCache
from lightning_moe.moe import MoE


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Unit scale."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _attend(q_BNTd: Tensor, k_BNSd: Tensor, v_BNSd: Tensor, scale: float) -> Tensor:
    """Causal scaled dot-product attention of the last T of S positions (earlier ones cached)."""
    T, S = q_BNTd.shape[2], k_BNSd.shape[2]
    if T == S:
        return F.scaled_dot_product_attention(q_BNTd, k_BNSd, v_BNSd, is_causal=True, scale=scale)
    mask_TS = torch.ones(T, S, dtype=torch.bool, device=q_BNTd.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q_BNTd, k_BNSd, v_BNSd, attn_mask=mask_TS, scale=scale)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and optional q/k norms.

    Args:
        config: heads, head width, biases, ``qk_norm`` and ``clip_qkv``.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        D, N, Nk, Hd = config.d_model, config.n_heads, config.kv_heads, config.attention_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = N, Nk, Hd
        self.qk_norm_mode = config.qk_norm
        self.clip_qkv = config.clip_qkv
        self.q_proj = nn.Linear(D, N * Hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Nk * Hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Nk * Hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(N * Hd, D, bias=config.out_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Hd, config.rms_norm_eps), RMSNorm(Hd, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(N * Hd, config.rms_norm_eps), RMSNorm(Nk * Hd, config.rms_norm_eps)

    def forward(self, x_BTD: Tensor, cos_TR: Tensor, sin_TR: Tensor, cache: KVCache | None = None) -> Tensor:
        """Attend causally over the cached positions and ``x``'s; the cache grows by T positions."""
        B, T, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm_mode == "full" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_BTNd = q.view(B, T, self.n_heads, self.head_dim)
        k_BTNd = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm_mode == "head" and self.q_norm is not None and self.k_norm is not None:
            q_BTNd, k_BTNd = self.q_norm(q_BTNd), self.k_norm(k_BTNd)
        q_BNTd = apply_rope(q_BTNd.transpose(1, 2), cos_TR, sin_TR)
        k_BNSd = apply_rope(k_BTNd.transpose(1, 2), cos_TR, sin_TR)
        v_BNSd = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            if cache.k is not None and cache.v is not None:
                k_BNSd = torch.cat([cache.k, k_BNSd], dim=2)
                v_BNSd = torch.cat([cache.v, v_BNSd], dim=2)
            cache.k, cache.v = k_BNSd, v_BNSd
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k_BNSd = k_BNSd.repeat_interleave(groups, dim=1)
            v_BNSd = v_BNSd.repeat_interleave(groups, dim=1)
        y_BNTd = _attend(q_BNTd, k_BNSd, v_BNSd, self.head_dim**-0.5)
        return self.o_proj(y_BNTd.transpose(1, 2).reshape(B, T, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values from a shared low-rank latent.

    Queries: ``q_proj(x)`` or ``q_b_proj(rmsnorm(q_a_proj(x)))``, split per head into a part without
    positions and a rotary part. Keys and values: ``kv_a_proj_with_mqa(x)`` gives a latent ``c``
    (width C, normed) and one rotary key shared by all heads; ``kv_b_proj(c)`` expands ``c`` into
    per-head keys (without positions) and values. The cache holds the latent and the rotary key
    only (``KVCache.k`` = ``[B, 1, S, C]``, ``KVCache.v`` = ``[B, 1, S, R]``).

    Args:
        config: an MLA configuration (``kv_lora_rank`` set).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        assert config.kv_lora_rank is not None
        D, N = config.d_model, config.n_heads
        self.n_heads = N
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.interleaved = config.rope_interleaved
        qk_dim = self.nope_dim + self.rope_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, N * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, N * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.latent_dim + self.rope_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.latent_dim, N * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(N * self.v_dim, D, bias=config.out_bias)
        self.scale = qk_dim**-0.5
        scaling = config.rope_scaling
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
            mscale_all_dim = scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                self.scale *= yarn_mscale(float(scaling["factor"]), mscale_all_dim) ** 2

    def forward(self, x_BTD: Tensor, cos_TR: Tensor, sin_TR: Tensor, cache: KVCache | None = None) -> Tensor:
        """Attend causally over the cached positions and ``x``'s; the cache grows by T positions."""
        B, T, _ = x_BTD.shape
        N = self.n_heads
        if self.q_proj is not None:
            q = self.q_proj(x_BTD)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BNTd = q.view(B, T, N, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BNTd.split([self.nope_dim, self.rope_dim], dim=-1)
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.latent_dim, self.rope_dim], dim=-1)
        latent_B1TC = self.kv_a_layernorm(latent_BTC)[:, None]
        q_rope = apply_rope(q_rope, cos_TR, sin_TR, self.interleaved)
        k_rope_B1SR = apply_rope(k_rope_BTR[:, None], cos_TR, sin_TR, self.interleaved)
        if cache is not None:
            if cache.k is not None and cache.v is not None:
                latent_B1TC = torch.cat([cache.k, latent_B1TC], dim=2)
                k_rope_B1SR = torch.cat([cache.v, k_rope_B1SR], dim=2)
            cache.k, cache.v = latent_B1TC, k_rope_B1SR
        S = latent_B1TC.shape[2]
        kv_BNSd = self.kv_b_proj(latent_B1TC[:, 0]).view(B, S, N, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v_BNSd = kv_BNSd.split([self.nope_dim, self.v_dim], dim=-1)
        k_BNSd = torch.cat([k_nope, k_rope_B1SR.expand(B, N, S, self.rope_dim)], dim=-1)
        q_BNTd = torch.cat([q_nope, q_rope], dim=-1)
        y_BNTd = _attend(q_BNTd, k_BNSd, v_BNSd, self.scale)
        return self.o_proj(y_BNTd.transpose(1, 2).reshape(B, T, N * self.v_dim))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` with a dense or MoE FFN.

    Args:
        config: the model configuration.
        moe: the FFN is a :class:`~lightning_moe.moe.MoE` layer.
    """

    def __init__(self, config: DecoderConfig, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.self_attn: Attention | LatentAttention = LatentAttention(config) if config.is_mla else Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp: MoE | FeedForward = (
            MoE(**config.moe_kwargs()) if moe else FeedForward(config.d_model, config.d_ff, "swiglu")
        )

    @property
    def is_moe(self) -> bool:
        """Whether this block's FFN is an MoE layer."""
        return isinstance(self.mlp, MoE)

    def forward(
        self,
        x_BTD: Tensor,
        cos_TR: Tensor,
        sin_TR: Tensor,
        padding_mask_BT: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Apply the block to ``x [B, T, D]``."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TR, sin_TR, cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD), padding_mask=padding_mask_BT)


class MoEDecoder(nn.Module):
    """Decoder-only language model of the published MoE families, on :class:`~lightning_moe.moe.MoE` layers.

    Args:
        config: the :class:`~lightning_moe.models.DecoderConfig` (``lightning_moe.hf`` builds one
            from a Hugging Face ``config.json``).

    Example:
        >>> cfg = DecoderConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        ...                     num_experts=4, top_k=2)
        >>> MoEDecoder(cfg)(torch.randint(100, (2, 9))).shape
        torch.Size([2, 9, 100])
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        moe = set(config.moe_indices())
        self.layers = nn.ModuleList(DecoderBlock(config, moe=i in moe) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init: ``N(0, std)`` linear and embedding weights, zero biases, unit norms.

        MoE layers keep their own initialisation (routers near uniform, fan-in scaled experts).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def output_weight(self) -> Tensor:
        """The ``[V, D]`` output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

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

        Raises:
            ValueError: if the sequence runs past ``max_positions``.
        """
        start = 0 if cache is None else cache.length
        T = input_ids_BT.shape[1]
        if start + T > self.config.max_positions:
            raise ValueError(
                f"sequence reaches position {start + T} but max_positions={self.config.max_positions}; shorten "
                f"it or load the model with max_positions >= {start + T}"
            )
        x_BTD = self.embed_tokens(input_ids_BT)
        cfg = self.config
        inv_freq, attention_factor = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, x_BTD.device)
        cos_TR, sin_TR = rope_cos_sin(inv_freq, start, T, attention_factor, x_BTD.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i].self_attn
            x_BTD = layer(x_BTD, cos_TR, sin_TR, padding_mask_BT, layer_cache)
        return F.linear(self.norm(x_BTD), self.output_weight())

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental decoding."""
        return DecoderCache([LayerCache() for _ in self.layers])

    @torch.no_grad()
    def generate(
        self,
        input_ids_BT: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        sync_finished: Callable[[bool], bool] | None = None,
    ) -> Tensor:
        """Continue prompts of equal length with the KV cache (greedy by default).

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
        total = torch.zeros((), device=self.embed_tokens.weight.device)
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                total = total + moe.aux_loss
        return total


__all__ = ["Attention", "DecoderBlock", "LatentAttention", "MoEDecoder", "RMSNorm"]
