"""Deterministic combine of the K (token, choice) slots of each token, and its backward.

Legend: T tokens, H hidden, K top-k, P = T * K slots (slot ``t * K + k``).

The expert kernels store each kept pair's row in its own slot, so combining is a plain reduction
over K in a fixed order: no atomics, bitwise reproducible. Dropped slots are never read (they
were never written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_moe.kernels.availability import interpreter_enabled


@triton.jit
def _combine_kernel(
    slots_ptr, weights_ptr, kept_ptr, out_ptr, T, H, stride_s, stride_o,
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < T
    h_mask = offs_h < H
    tok = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):
        kept = tl.load(kept_ptr + tok * K + k, mask=t_mask, other=0) != 0
        rows = tl.load(
            slots_ptr + (tok * K + k)[:, None] * stride_s + offs_h[None, :],
            mask=kept[:, None] & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if WEIGHTED:
            rows = rows * tl.load(weights_ptr + tok * K + k, mask=kept, other=0.0)[:, None]
        acc += rows
    out_ptrs = out_ptr + tok[:, None] * stride_o + offs_h[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, slots_ptr, kept_ptr, dweights_ptr, T, H, stride_dy, stride_s,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    tok = offs_t.to(tl.int64)
    offs_k = tl.arange(0, K_POW2)
    offs_h = tl.arange(0, BLOCK_H)
    tk_mask = t_mask[:, None] & (offs_k < K)[None, :]
    kept_tk = tl.load(kept_ptr + tok[:, None] * K + offs_k[None, :], mask=tk_mask, other=0) != 0
    acc = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = offs_h + h0 < H
        dy = tl.load(
            dy_ptr + tok[:, None] * stride_dy + (offs_h + h0)[None, :],
            mask=t_mask[:, None] & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        for k in tl.static_range(K):
            kept = tl.load(kept_ptr + tok * K + k, mask=t_mask, other=0) != 0
            rows = tl.load(
                slots_ptr + (tok * K + k)[:, None] * stride_s + (offs_h + h0)[None, :],
                mask=kept[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.where(offs_k[None, :] == k, tl.sum(dy * rows, axis=1)[:, None], 0.0)
    acc = tl.where(kept_tk, acc, 0.0)
    tl.store(dweights_ptr + tok[:, None] * K + offs_k[None, :], acc, mask=tk_mask)


def _blocks(H: int) -> tuple[int, int]:
    if interpreter_enabled():
        return 4, 32
    block_h = min(1024, triton.next_power_of_2(H))
    return max(1, 4096 // block_h), block_h


def combine(slots_PH: Tensor, kept_TK: Tensor, weights_TK: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``y[t] = sum_k kept[t, k] * w[t, k] * slots[t * K + k]`` (unweighted if ``weights_TK`` is None).

    Args:
        slots_PH: ``[T * K, H]`` per-slot rows (only kept slots are read).
        kept_TK: ``[T, K]`` bool.
        weights_TK: ``[T, K]`` float32 combine weights, or None for a plain sum.
        out_dtype: dtype of the result.

    Returns:
        ``[T, H]``.
    """
    T, K = kept_TK.shape
    H = slots_PH.shape[1]
    out = torch.empty(T, H, device=slots_PH.device, dtype=out_dtype)
    block_t, block_h = _blocks(H)
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    if T == 0:
        return out
    _combine_kernel[grid](
        slots_PH, weights_TK if weights_TK is not None else slots_PH, kept_TK.view(torch.int8), out,
        T, H, slots_PH.stride(0), out.stride(0),
        K=K, WEIGHTED=weights_TK is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out


def combine_weights_grad(dy_TH: Tensor, slots_PH: Tensor, kept_TK: Tensor) -> Tensor:
    """Gradient of the combine weights: ``dw[t, k] = kept[t, k] * <dy[t], slots[t * K + k]>`` (float32)."""
    T, K = kept_TK.shape
    H = slots_PH.shape[1]
    dweights = torch.empty(T, K, device=dy_TH.device, dtype=torch.float32)
    block_h = 32 if interpreter_enabled() else min(256, triton.next_power_of_2(H))
    block_t = 4 if interpreter_enabled() else 16
    if T == 0:
        return dweights
    _combine_bwd_kernel[(triton.cdiv(T, block_t),)](
        dy_TH, slots_PH, kept_TK.view(torch.int8), dweights, T, H, dy_TH.stride(0), slots_PH.stride(0),
        K=K, K_POW2=max(2, triton.next_power_of_2(K)), BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return dweights
