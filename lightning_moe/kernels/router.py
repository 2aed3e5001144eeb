"""Fused router: logits, then one pass over them for gating, counts, losses and capacity slots.

Legend: T tokens, H hidden, E experts, K top-k, B token blocks (of BLOCK_T priority slots),
P = T * K (token, choice) pairs, N kept pairs (rows of the expert-sorted order).

Four launches, no atomics, no host sync (except ``num_tokens`` under a padding mask, which the
capacity formula needs on the host, as in the reference):

1. ``_logits_kernel``: ``logits_TE = x_TH @ W_EH^T`` in float32. A bf16/fp16 ``x`` is exact in
   both halves of ``W = W_hi + W_lo`` (each in ``x``'s dtype), so two tensor-core dots with fp32
   accumulation give logits within about 2^-16 relative of the float32 reference, at the speed of
   a bf16 GEMM; a float32 ``x`` (router jitter) uses a float32 dot.
2. ``_gate_kernel``: per block of tokens in priority order (token order, or a random permutation
   for Random Token Selection): softmax, log-sum-exp, entropy, top-k (lowest index wins ties),
   the rank of each (token, choice) among the block's pairs of the same (choice level, expert),
   the block's histogram ``hist_BKE``, and the block's partial sums for the aux loss and z-loss.
3. ``_scan_kernel``: per expert, an exclusive scan of the histograms over (level, block): the slot
   offset of each block, the per-expert counts, and the column sums of the probabilities.
4. ``_assign_kernel``: per block: position = offset + rank, kept = position < capacity, combine
   weights (renormalised over kept choices for K > 1), and the expert-sorted permutation
   ``row_pair_N`` (row ``start_e + position`` holds pair ``t * K + k``: slot order inside an
   expert, which is priority order, so the permutation is deterministic). Program 0 also writes
   the aux loss, z-loss, entropy sum and token count.

The backward (``_router_bwd_kernel``) forms ``dlogits_TE`` from the gradients of the combine
weights, the aux loss and the z-loss in one pass; ``dx = dlogits @ W`` and ``dW = dlogits^T @ x``
(``_router_dx_kernel``, ``_router_dw_kernel``) again split the float32 operands into 16-bit
halves (about 2^-16 relative, float32 accumulation; ``dW`` reduces over all tokens in one program
per tile, so it is deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_moe.kernels.availability import interpreter_enabled
from lightning_moe.moe.router import RoutingResult, compute_capacity


@triton.jit
def _mix(v, key):
    """A 32-bit integer hash of ``v ^ key`` (the Feistel round function)."""
    v = (v ^ key).to(tl.uint32)
    v = ((v >> 16) ^ v) * 0x45D9F3B
    v = ((v >> 16) ^ v) * 0x45D9F3B
    return (v >> 16) ^ v


@triton.jit
def _feistel(x, k0, k1, k2, k3, half_bits):
    """A keyed bijection of ``[0, 2^(2 half_bits))`` (uint32 ``x``): four Feistel rounds."""
    half_bits = half_bits.to(tl.uint32)
    mask = (tl.full((), 1, tl.uint32) << half_bits) - 1
    left = (x >> half_bits) & mask
    right = x & mask
    left, right = right, left ^ (_mix(right, k0) & mask)
    left, right = right, left ^ (_mix(right, k1) & mask)
    left, right = right, left ^ (_mix(right, k2) & mask)
    left, right = right, left ^ (_mix(right, k3) & mask)
    return (left << half_bits) | right


@triton.jit
def _priority_token(offs_p, p_mask, T, k0, k1, k2, k3, half_bits):
    """Token at priority position ``p`` under Random Token Selection.

    A keyed pseudo-random permutation of ``[0, T)`` (Feistel network on ``2^(2 half_bits) >= T``
    values, cycle-walked back into range), computed in place: no permutation is drawn or stored.
    """
    x = _feistel(offs_p.to(tl.uint32), k0, k1, k2, k3, half_bits)
    out = (x >= T) & p_mask
    while tl.max(out.to(tl.int32), axis=0) > 0:
        x = tl.where(out, _feistel(x, k0, k1, k2, k3, half_bits), x)
        out = (x >= T) & p_mask
    return tl.where(p_mask, x, 0).to(tl.int64)


@triton.jit
def _token_block(valid_ptr, T, k0, k1, k2, k3, half_bits,
                 HAS_VALID: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Block ``program_id(0)`` of priority positions: ``(position < T, token, token is not padding)``.

    The token of a position is the position itself, or under Random Token Selection its image
    under the keyed permutation.
    """
    offs_p = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    p_mask = offs_p < T
    if HAS_PERM:
        tok = _priority_token(offs_p, p_mask, T, k0, k1, k2, k3, half_bits)
    else:
        tok = offs_p.to(tl.int64)
    valid = p_mask
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + tok, mask=p_mask, other=0) != 0)
    return p_mask, tok, valid


@triton.jit(do_not_specialize=["k0", "k1", "k2", "k3"])
def _permutation_kernel(out_ptr, T, k0, k1, k2, k3, half_bits, BLOCK: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p_mask = offs_p < T
    tok = _priority_token(offs_p, p_mask, T, k0, k1, k2, k3, half_bits)
    tl.store(out_ptr + offs_p, tok, mask=p_mask)


@triton.jit
def _logits_kernel(
    x_ptr, w_ptr, out_ptr, T, H, E, stride_x, stride_w,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    t_mask = offs_t < T
    e_mask = offs_e < E
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_h[None, :]
    w_offs = offs_e.to(tl.int64)[None, :] * stride_w + offs_h[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = offs_h + h0 < H
        a = tl.load(x_ptrs + h0, mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        b = tl.load(w_ptr + w_offs + h0, mask=h_mask[:, None] & e_mask[None, :], other=0.0)
        if SPLIT:
            # The float32 weight as two halves of x's dtype: W = W_hi + W_lo to about 2^-16.
            b_hi = b.to(a.dtype)
            acc = tl.dot(a, b_hi, acc)
            acc = tl.dot(a, (b - b_hi.to(tl.float32)).to(a.dtype), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :]
    tl.store(out_ptrs, acc, mask=t_mask[:, None] & e_mask[None, :])


@triton.jit(do_not_specialize=["k0", "k1", "k2", "k3"])  # random keys: no recompiles
def _gate_kernel(
    logits_ptr, valid_ptr, probs_ptr, lse_ptr, idx_ptr, topp_ptr, rank_ptr,
    hist_ptr, psum_ptr, stats_ptr, T, E, k0, k1, k2, k3, half_bits,
    K: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p_mask, tok, valid = _token_block(valid_ptr, T, k0, k1, k2, k3, half_bits, HAS_VALID, HAS_PERM, BLOCK_T)
    valid_f = valid.to(tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    te_mask = p_mask[:, None] & e_mask[None, :]
    logits = tl.load(logits_ptr + tok[:, None] * E + offs_e[None, :], mask=te_mask, other=0.0)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    ex = tl.exp(logits - row_max[:, None])
    denom = tl.sum(ex, axis=1)
    probs = ex / denom[:, None]
    lse = row_max + tl.log(denom)
    tl.store(probs_ptr + tok[:, None] * E + offs_e[None, :], probs, mask=te_mask)
    tl.store(lse_ptr + tok, lse, mask=p_mask)
    plogp = tl.where(e_mask[None, :], probs * tl.log(tl.maximum(probs, 1e-30)), 0.0)
    entropy = -tl.sum(plogp, axis=1)

    work = tl.where(e_mask[None, :], probs, -1.0)
    for k in tl.static_range(K):
        top_p = tl.max(work, axis=1)
        top_e = tl.min(tl.where(work == top_p[:, None], offs_e[None, :], BLOCK_E), axis=1)
        onehot = offs_e[None, :] == top_e[:, None]
        counted = (onehot & valid[:, None]).to(tl.int32)
        rank = tl.sum(tl.where(onehot, tl.cumsum(counted, axis=0) - 1, 0), axis=1)
        tl.store(idx_ptr + tok * K + k, top_e.to(tl.int64), mask=p_mask)
        tl.store(topp_ptr + tok * K + k, top_p, mask=p_mask)
        tl.store(rank_ptr + tok * K + k, rank, mask=p_mask)
        tl.store(hist_ptr + (b * K + k) * E + offs_e, tl.sum(counted, axis=0), mask=e_mask)
        work = tl.where(onehot, -2.0, work)
    tl.store(psum_ptr + b * E + offs_e, tl.sum(probs * valid_f[:, None], axis=0), mask=e_mask)
    tl.store(stats_ptr + b * 2, tl.sum(valid_f * lse * lse, axis=0))
    tl.store(stats_ptr + b * 2 + 1, tl.sum(valid_f * entropy, axis=0))


@triton.jit
def _scan_kernel(
    hist_ptr, offsets_ptr, psum_part_ptr, counts_ptr, kept_ptr, psum_ptr, B, E, capacity,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_b = tl.arange(0, BLOCK_B)
    mask = (offs_b < B)[:, None] & (offs_e < E)[None, :]
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for k in tl.static_range(K):
        ptrs = (offs_b[:, None] * K + k) * E + offs_e[None, :]
        h = tl.load(hist_ptr + ptrs, mask=mask, other=0)
        tl.store(offsets_ptr + ptrs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=mask)
        carry += tl.sum(h, axis=0)
    e_mask = offs_e < E
    tl.store(counts_ptr + offs_e, carry.to(tl.float32), mask=e_mask)
    tl.store(kept_ptr + offs_e, tl.minimum(carry, capacity), mask=e_mask)
    psum = tl.load(psum_part_ptr + offs_b[:, None] * E + offs_e[None, :], mask=mask, other=0.0)
    tl.store(psum_ptr + offs_e, tl.sum(psum, axis=0), mask=e_mask)


@triton.jit(do_not_specialize=["k0", "k1", "k2", "k3"])
def _assign_kernel(
    valid_ptr, idx_ptr, topp_ptr, rank_ptr, offsets_ptr, kept_e_ptr, counts_ptr, psum_ptr,
    stats_ptr, kept_ptr, weights_ptr, row_pair_ptr, losses_ptr,
    T, E, B, capacity, aux_scale, num_tokens, eps, k0, k1, k2, k3, half_bits,
    K: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PERM: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p_mask, tok, valid = _token_block(valid_ptr, T, k0, k1, k2, k3, half_bits, HAS_VALID, HAS_PERM, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    kept_e = tl.load(kept_e_ptr + offs_e, mask=offs_e < E, other=0)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(idx_ptr + tok * K + k, mask=p_mask, other=0).to(tl.int32)
        pos = tl.load(rank_ptr + tok * K + k, mask=p_mask, other=0)
        pos += tl.load(offsets_ptr + (b * K + k) * E + e, mask=p_mask, other=0)
        kept = valid & (pos < capacity)
        # Row of the pair in expert-sorted order: the expert's start (kept rows of the experts
        # before it) plus its slot.
        start = tl.sum(tl.where(offs_e[None, :] < e[:, None], kept_e[None, :], 0), axis=1)
        tl.store(row_pair_ptr + start + pos, (tok * K + k).to(tl.int32), mask=kept)
        tl.store(kept_ptr + tok * K + k, kept.to(tl.int8), mask=p_mask)
        total += tl.where(kept, tl.load(topp_ptr + tok * K + k, mask=p_mask, other=0.0), 0.0)
    if RENORM:
        scale = 1.0 / tl.maximum(total, eps)
    else:
        scale = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
    for k in tl.static_range(K):
        kept = tl.load(kept_ptr + tok * K + k, mask=p_mask, other=0) != 0
        top_p = tl.load(topp_ptr + tok * K + k, mask=p_mask, other=0.0)
        tl.store(weights_ptr + tok * K + k, tl.where(kept, top_p * scale, 0.0), mask=p_mask)

    if b == 0:
        e_mask = offs_e < E
        counts = tl.load(counts_ptr + offs_e, mask=e_mask, other=0.0)
        psum = tl.load(psum_ptr + offs_e, mask=e_mask, other=0.0)
        offs_b = tl.arange(0, BLOCK_B)
        stats_z = tl.load(stats_ptr + offs_b * 2, mask=offs_b < B, other=0.0)
        stats_ent = tl.load(stats_ptr + offs_b * 2 + 1, mask=offs_b < B, other=0.0)
        denom = tl.maximum(num_tokens, 1.0)
        tl.store(losses_ptr, tl.sum(counts * psum, axis=0) * aux_scale)
        tl.store(losses_ptr + 1, tl.sum(stats_z, axis=0) / denom)
        tl.store(losses_ptr + 2, tl.sum(stats_ent, axis=0))
        tl.store(losses_ptr + 3, num_tokens)


@triton.jit
def _router_bwd_kernel(
    probs_ptr, lse_ptr, idx_ptr, topp_ptr, kept_ptr, weights_ptr, dweights_ptr, dlosses_ptr,
    counts_ptr, valid_ptr, dlogits_ptr, T, E, aux_scale, z_scale, eps,
    K: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DW: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    tok = offs_t.to(tl.int64)
    valid = t_mask
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + tok, mask=t_mask, other=0) != 0)
    valid_f = valid.to(tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    te_mask = t_mask[:, None] & e_mask[None, :]
    probs = tl.load(probs_ptr + tok[:, None] * E + offs_e[None, :], mask=te_mask, other=0.0)
    lse = tl.load(lse_ptr + tok, mask=t_mask, other=0.0)
    d_aux = tl.load(dlosses_ptr)
    d_z = tl.load(dlosses_ptr + 1)
    counts = tl.load(counts_ptr + offs_e, mask=e_mask, other=0.0)
    # aux = aux_scale * sum_e(counts_e * sum_t(valid_t * probs_te)); counts carry no gradient.
    dprobs = valid_f[:, None] * (d_aux * aux_scale * counts)[None, :]
    if HAS_DW:
        # w_k = kept_k p_k / S with S = sum_j kept_j p_j (K > 1), so
        # dL/dp_k = kept_k (dw_k - sum_j dw_j w_j) / S; for K = 1, w = kept p.
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k in tl.static_range(K):
            kept = tl.load(kept_ptr + tok * K + k, mask=t_mask, other=0) != 0
            dot += tl.load(dweights_ptr + tok * K + k, mask=t_mask, other=0.0) * tl.load(
                weights_ptr + tok * K + k, mask=t_mask, other=0.0
            )
            total += tl.where(kept, tl.load(topp_ptr + tok * K + k, mask=t_mask, other=0.0), 0.0)
        for k in tl.static_range(K):
            kept = tl.load(kept_ptr + tok * K + k, mask=t_mask, other=0) != 0
            dw = tl.load(dweights_ptr + tok * K + k, mask=t_mask, other=0.0)
            if RENORM:
                dp = tl.where(total >= eps, (dw - dot) / tl.maximum(total, eps), dw / eps)
            else:
                dp = dw
            dp = tl.where(kept, dp, 0.0)
            e = tl.load(idx_ptr + tok * K + k, mask=t_mask, other=0).to(tl.int32)
            dprobs += tl.where(offs_e[None, :] == e[:, None], dp[:, None], 0.0)
    dlogits = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])
    dlogits += (d_z * z_scale * valid_f * lse)[:, None] * probs
    tl.store(dlogits_ptr + tok[:, None] * E + offs_e[None, :], dlogits, mask=te_mask)


@triton.jit
def _router_dx_kernel(
    dl_ptr, w_ptr, dx_ptr, T, H, E, stride_dx,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """``dx = dlogits @ W``: with SPLIT, three products of 16-bit halves (hi*hi + hi*lo + lo*hi)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < T
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e_mask = offs_e + e0 < E
        a = tl.load(
            dl_ptr + offs_t.to(tl.int64)[:, None] * E + (offs_e + e0)[None, :],
            mask=t_mask[:, None] & e_mask[None, :],
            other=0.0,
        )
        w_offs = (offs_e + e0).to(tl.int64)[:, None] * H + offs_h[None, :]
        w_mask = e_mask[:, None] & h_mask[None, :]
        b = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        if SPLIT:
            b_hi = b.to(dx_ptr.dtype.element_ty)
            b_lo = (b - b_hi.to(tl.float32)).to(b_hi.dtype)
            a_hi = a.to(b_hi.dtype)
            a_lo = (a - a_hi.to(tl.float32)).to(b_hi.dtype)
            acc = tl.dot(a_hi, b_hi, acc)
            acc = tl.dot(a_lo, b_hi, acc)
            acc = tl.dot(a_hi, b_lo, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dx + offs_h[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


@triton.jit
def _router_dw_kernel(
    dl_ptr, x_ptr, dw_ptr, T, H, E, stride_x, chunk,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """``dW = dlogits^T @ x`` over the tokens of chunk ``program_id(2)``, one program per tile.

    Each chunk's fp32 partial sum goes to its own slice of ``dw`` (``[chunks, E, H]``); the
    caller sums the slices in a fixed order: no atomics, deterministic.
    """
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_t = tl.arange(0, BLOCK_T)
    e_mask = offs_e < E
    h_mask = offs_h < H
    t_start = tl.program_id(2) * chunk
    t_end = tl.minimum(t_start + chunk, T)
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t_mask = offs_t + t0 < t_end
        rows = (offs_t + t0).to(tl.int64)
        a = tl.load(dl_ptr + rows[:, None] * E + offs_e[None, :], mask=t_mask[:, None] & e_mask[None, :], other=0.0)
        b = tl.load(
            x_ptr + rows[:, None] * stride_x + offs_h[None, :], mask=t_mask[:, None] & h_mask[None, :], other=0.0
        )
        if SPLIT:
            # x is exact in its 16-bit dtype; dlogits = hi + lo in that dtype.
            a_hi = a.to(b.dtype)
            a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
            acc = tl.dot(tl.trans(a_hi), b, acc)
            acc = tl.dot(tl.trans(a_lo), b, acc)
        else:
            acc = tl.dot(tl.trans(a), b.to(tl.float32), acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + (tl.program_id(2) * E + offs_e).to(tl.int64)[:, None] * H + offs_h[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=e_mask[:, None] & h_mask[None, :])


@dataclass
class TritonRoutingResult(RoutingResult):
    """A :class:`RoutingResult` with the dispatch order the fused kernels consume.

    Attributes:
        row_pair: ``[T * K]`` int32; entry ``r < N`` is the flat pair ``t * K + k`` of row ``r`` of
            the expert-sorted order (the rest is unused).
        kept_per_expert: ``[E]`` int32 kept pairs per expert (rows of each expert, in order).
    """

    row_pair: Tensor | None = None
    kept_per_expert: Tensor | None = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _half_bits(T: int) -> int:
    """Half the bits of the Feistel domain ``2^(2h) >= T`` (h >= 2, a run-time argument: no recompiles)."""
    return max(2, ((max(T, 2) - 1).bit_length() + 1) // 2)


def _gate_block(T: int) -> int:
    """Tokens per gate/assign block: small for parallelism, large enough to bound the scan tile."""
    block = 32
    while triton.cdiv(T, block) > 4096:
        block *= 2
    return block


class _FusedRouter(torch.autograd.Function):
    """Differentiable outputs: ``weights_TK`` and ``losses_4`` (aux, z, entropy sum, tokens)."""

    @staticmethod
    def forward(ctx, x_TH, weight_EH, valid_T, rts_keys, top_k, capacity, num_tokens):  # type: ignore[override]
        T, H = x_TH.shape
        E, K = weight_EH.shape[0], top_k
        device = x_TH.device
        interpret = interpreter_enabled()
        x_TH = x_TH.contiguous()
        # Logits in float32. A 16-bit x: the kernel splits the float32 weight into two halves of
        # x's dtype; a float32 x (router jitter) takes a float32 product.
        w32 = weight_EH.float().contiguous()
        split = x_TH.dtype != torch.float32
        precision = "tf32" if split else ("ieee" if interpret else "tf32x3")
        logits_TE = torch.empty(T, E, device=device, dtype=torch.float32)
        block_e = min(128, max(16, _next_pow2(E)))
        block_t = 16 if interpret else 64
        block_h = 16 if interpret else 64
        _logits_kernel[(triton.cdiv(T, block_t), triton.cdiv(E, block_e))](
            x_TH, w32, logits_TE, T, H, E, x_TH.stride(0), w32.stride(0),
            SPLIT=split, PRECISION=precision, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h,
            num_warps=4, num_stages=3,
        )  # fmt: skip

        block_t = _gate_block(T)
        B = triton.cdiv(T, block_t)
        block_e = max(2, _next_pow2(E))
        f32 = dict(device=device, dtype=torch.float32)
        probs_TE = torch.empty(T, E, **f32)
        lse_T = torch.empty(T, **f32)
        idx_TK = torch.empty(T, K, device=device, dtype=torch.int64)
        topp_TK = torch.empty(T, K, **f32)
        # Scratch in two allocations: ranks, block histograms and their offsets (int32); partial
        # sums (float32).
        i32_ws = torch.empty(T * K + 2 * B * K * E + E, device=device, dtype=torch.int32)
        rank_TK, hist_BKE, offsets_BKE, kept_E = torch.split(i32_ws, [T * K, B * K * E, B * K * E, E])
        f32_ws = torch.empty(B * E + 2 * B + E, **f32)
        psum_BE, stats_B2, psum_E = torch.split(f32_ws, [B * E, 2 * B, E])
        has_valid, has_perm = valid_T is not None, rts_keys is not None
        keys = rts_keys if has_perm else (0, 0, 0, 0)
        half_bits = _half_bits(T)
        valid_arg = valid_T if has_valid else lse_T
        gate_warps = 4 if block_e <= 128 else 8
        _gate_kernel[(B,)](
            logits_TE, valid_arg, probs_TE, lse_T, idx_TK, topp_TK, rank_TK,
            hist_BKE, psum_BE, stats_B2, T, E, *keys, half_bits,
            K=K, HAS_VALID=has_valid, HAS_PERM=has_perm,
            BLOCK_T=block_t, BLOCK_E=block_e, num_warps=gate_warps,
        )  # fmt: skip

        counts_E = torch.empty(E, **f32)
        block_b = max(2, _next_pow2(B))
        scan_e = max(1, min(_next_pow2(E), 8192 // block_b))
        cap = T * K + 1 if capacity is None else capacity
        _scan_kernel[(triton.cdiv(E, scan_e),)](
            hist_BKE, offsets_BKE, psum_BE, counts_E, kept_E, psum_E, B, E, cap,
            K=K, BLOCK_B=block_b, BLOCK_E=scan_e, num_warps=4,
        )  # fmt: skip

        kept_TK = torch.empty(T, K, device=device, dtype=torch.int8)
        weights_TK = torch.empty(T, K, **f32)
        row_pair = torch.empty(T * K, device=device, dtype=torch.int32)
        losses_4 = torch.empty(4, **f32)
        denom = max(float(num_tokens), 1.0)
        aux_scale = E / (denom * denom * K)
        eps = torch.finfo(torch.float32).eps
        _assign_kernel[(B,)](
            valid_arg, idx_TK, topp_TK, rank_TK, offsets_BKE, kept_E, counts_E, psum_E,
            stats_B2, kept_TK, weights_TK, row_pair, losses_4,
            T, E, B, cap, aux_scale, float(num_tokens), eps, *keys, half_bits,
            K=K, HAS_VALID=has_valid, HAS_PERM=has_perm, RENORM=K > 1,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=gate_warps,
        )  # fmt: skip
        kept_TK = kept_TK.view(torch.bool)
        ctx.save_for_backward(
            x_TH, weight_EH, w32, valid_T, probs_TE, lse_T, idx_TK, topp_TK, kept_TK, weights_TK, counts_E
        )
        ctx.consts = (aux_scale, 2.0 / denom, eps, K, split, precision)
        ctx.mark_non_differentiable(probs_TE, idx_TK, kept_TK, counts_E, kept_E, row_pair)
        return weights_TK, losses_4, probs_TE, idx_TK, kept_TK, counts_E, kept_E, row_pair

    @staticmethod
    def backward(ctx, dweights_TK, dlosses_4, *_):  # type: ignore[override]
        saved = ctx.saved_tensors
        x_TH, weight_EH, w32, valid_T, probs_TE, lse_T, idx_TK, topp_TK, kept_TK, weights_TK, counts_E = saved
        aux_scale, z_scale, eps, K, split, precision = ctx.consts
        T, E = probs_TE.shape
        if dlosses_4 is None:
            dlosses_4 = torch.zeros(4, device=x_TH.device, dtype=torch.float32)
        has_dw = dweights_TK is not None
        dlogits_TE = torch.empty_like(probs_TE)
        block_t = 16 if interpreter_enabled() else 32
        block_e = max(2, _next_pow2(E))
        _router_bwd_kernel[(triton.cdiv(T, block_t),)](
            probs_TE, lse_T, idx_TK, topp_TK, kept_TK.view(torch.int8), weights_TK,
            dweights_TK.contiguous() if has_dw else weights_TK, dlosses_4.contiguous(), counts_E,
            valid_T if valid_T is not None else lse_T, dlogits_TE, T, E, aux_scale, z_scale, eps,
            K=K, HAS_VALID=valid_T is not None, HAS_DW=has_dw, RENORM=K > 1,
            BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4 if block_e <= 128 else 8,
        )  # fmt: skip
        dx = dw = None
        H = x_TH.shape[1]
        interpret = interpreter_enabled()
        block_e = min(64, max(16, _next_pow2(E)))
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x_TH)
            block_t, block_h = (16, 16) if interpret else (64, 128)
            _router_dx_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
                dlogits_TE, w32, dx, T, H, E, dx.stride(0),
                SPLIT=split, PRECISION=precision, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_E=block_e,
                num_warps=4, num_stages=3,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            block_h, block_t = (16, 16) if interpret else (64, 64)
            tiles = triton.cdiv(E, block_e) * triton.cdiv(H, block_h)
            # Split the token reduction into chunks until the grid covers the GPU (about 4
            # programs per SM on an H200), then add the chunks' partial sums in a fixed order.
            chunks = max(1, min(triton.cdiv(528, tiles), triton.cdiv(T, 8 * block_t)))
            chunk = triton.cdiv(triton.cdiv(T, chunks), block_t) * block_t
            chunks = triton.cdiv(T, chunk)
            dw = torch.empty(chunks, E, H, device=x_TH.device, dtype=torch.float32 if chunks > 1 else weight_EH.dtype)
            _router_dw_kernel[(triton.cdiv(E, block_e), triton.cdiv(H, block_h), chunks)](
                dlogits_TE, x_TH, dw, T, H, E, x_TH.stride(0), chunk,
                SPLIT=split, PRECISION=precision, BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_T=block_t,
                num_warps=4, num_stages=3,
            )  # fmt: skip
            dw = dw[0] if chunks == 1 else dw.sum(0).to(weight_EH.dtype)
        return dx, dw, None, None, None, None, None


def fused_route(
    x_TH: Tensor,
    weight_EH: Tensor,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int = 4,
    padding_mask_T: Tensor | None = None,
    random_priority: bool = False,
    jitter: float = 0.0,
) -> TritonRoutingResult:
    """Route a flat batch of tokens with the fused kernels (same semantics as :class:`Router`).

    Args:
        x_TH: ``[T, H]`` tokens (float32, bfloat16 or float16).
        weight_EH: ``[E, H]`` gate weight.
        top_k: K.
        capacity_factor: slots per expert relative to a balanced load; ``None`` is dropless.
        min_capacity: lower bound on slots per expert.
        padding_mask_T: optional ``[T]`` bool, True marks padding tokens.
        random_priority: Random Token Selection (a random token priority inside each level).
        jitter: multiplicative input jitter epsilon (0 turns it off).

    Returns:
        The routing, with the expert-sorted permutation for the fused expert kernels.
    """
    T = x_TH.shape[0]
    E = weight_EH.shape[0]
    valid_T = None
    num_tokens = T
    if padding_mask_T is not None:
        valid_T = (~padding_mask_T.bool()).contiguous().view(torch.int8)
        num_tokens = int(valid_T.sum().item())
    capacity = None
    if capacity_factor is not None:
        capacity = compute_capacity(num_tokens, E, top_k, capacity_factor, min_capacity)
    rts_keys = None
    if random_priority and capacity is not None:
        # Keys of the in-kernel pseudo-random token permutation, from torch's CPU generator (so
        # torch.manual_seed reproduces them): no device permutation is drawn.
        rts_keys = tuple(torch.randint(0, 2**31 - 1, (4,)).tolist())
    if jitter > 0:
        x_TH = x_TH.float() * torch.empty(x_TH.shape, device=x_TH.device).uniform_(1.0 - jitter, 1.0 + jitter)
    weights_TK, losses_4, probs_TE, idx_TK, kept_TK, counts_E, kept_E, row_pair = _FusedRouter.apply(
        x_TH, weight_EH, valid_T, rts_keys, top_k, capacity, num_tokens
    )
    return TritonRoutingResult(
        expert_indices=idx_TK,
        weights=weights_TK,
        kept=kept_TK,
        tokens_per_expert=counts_E,
        aux_loss=losses_4[0],
        z_loss=losses_4[1],
        probs=probs_TE,
        entropy_sum=losses_4[2].detach(),
        num_tokens=losses_4[3].detach(),
        capacity=capacity,
        row_pair=row_pair,
        kept_per_expert=kept_E,
    )


def rts_permutation(T: int, keys: tuple[int, int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """The token order Random Token Selection uses for ``keys``: ``out[p]`` is the token at priority ``p``.

    The router kernels compute the same permutation in place (a four-round Feistel network keyed
    by ``keys``, cycle-walked into ``[0, T)``); this materialises it, for inspection and tests.

    Args:
        T: number of tokens.
        keys: four integers in ``[0, 2^31)``.
        device: where to compute it.

    Returns:
        ``[T]`` int64 permutation of ``range(T)``.
    """
    out = torch.empty(T, device=device, dtype=torch.int64)
    if T == 0:
        return out
    block = 64 if interpreter_enabled() else 1024
    half_bits = _half_bits(T)
    _permutation_kernel[(triton.cdiv(T, block),)](out, T, *keys, half_bits, BLOCK=block)
    return out
