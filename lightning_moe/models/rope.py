"""Rotary position embeddings (RoPE) and the frequency scalings published checkpoints use.

Legend: B batch, N heads, T positions, R rotary dimensions (even).

``rope_frequencies`` returns the ``R / 2`` inverse frequencies and the factor on cos/sin for a
scaling type: ``"default"`` (Su et al. 2021), ``"linear"`` (position interpolation), ``"llama3"``
(Llama 3.1) and ``"yarn"`` (Peng et al. 2023; DeepSeek-V3). The formulas follow Hugging Face
``transformers``' ``modeling_rope_utils`` so that converted checkpoints compute the same function.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, float]:
    """Inverse frequencies of ``dim`` rotary dimensions and the factor applied to cos and sin.

    Args:
        dim: R, rotary dimensions per head (even).
        theta: the base wavelength (``rope_theta``).
        scaling: ``None`` or a dict with ``"rope_type"`` in :data:`ROPE_TYPES` and that type's
            fields (``factor``, ``original_max_position_embeddings``, ``low_freq_factor``,
            ``high_freq_factor``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``,
            ``attention_factor``, ``truncate``), as in a Hugging Face ``config.json``.
        device: where to build the tensor.

    Returns:
        ``(inv_freq [R / 2] float32, attention_factor)``.

    Raises:
        ValueError: for an unknown scaling type, naming the supported ones.
    """
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported types are {ROPE_TYPES}")
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta**exponent)
    if rope_type == "default" or scaling is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled), 1.0
    # yarn
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    old_len = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    inv_freq: Tensor, start: int, length: int, attention_factor: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of positions ``[start, start + length)``, each ``[length, R]`` (halves repeated)."""
    positions = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    freqs_TR2 = positions[:, None] * inv_freq[None, :]
    emb_TR = torch.cat([freqs_TR2, freqs_TR2], dim=-1)
    return (emb_TR.cos() * attention_factor).to(dtype), (emb_TR.sin() * attention_factor).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BNTR: Tensor, cos_TR: Tensor, sin_TR: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate ``x`` by its positions' angles.

    Args:
        x_BNTR: queries or keys, rotary dimensions last.
        cos_TR: from :func:`rope_cos_sin`.
        sin_TR: from :func:`rope_cos_sin`.
        interleaved: the rotated pairs are ``(x0, x1), (x2, x3), ...`` (DeepSeek) instead of
            ``(x_i, x_{i + R/2})`` (Llama). The output lists the pairs' first elements, then their
            second elements; queries and keys get the same layout, so their dot products are those
            of the interleaved rotation.

    Returns:
        The rotated tensor, same shape.
    """
    if interleaved:
        half = cos_TR.shape[-1] // 2
        cos, sin = cos_TR[..., :half], sin_TR[..., :half]
        x1, x2 = x_BNTR[..., 0::2], x_BNTR[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return x_BNTR * cos_TR + _rotate_half(x_BNTR) * sin_TR


__all__ = ["ROPE_TYPES", "apply_rope", "rope_cos_sin", "rope_frequencies", "yarn_mscale"]
