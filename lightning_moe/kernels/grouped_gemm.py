"""Grouped GEMMs over expert-contiguous rows, with the gather in the A load and the scatter in the store.

Legend: T tokens, H hidden, F ffn, E experts, K top-k, P = T * K pairs, N rows in expert-sorted
order (row ``r`` belongs to pair ``row_pair[r]``, token ``row_pair[r] // K``), M/N/R the GEMM's
output rows, output columns and reduction dim inside a kernel.

Rows of expert ``e`` are ``[start_e, start_e + count_e)``. A program of the row-grouped kernels
finds its expert and row tile from ``counts_E`` alone (a cumulative sum of ``ceil(count / BLOCK_M)``
over experts), so the grid is the upper bound ``ceil(P / BLOCK_M) + E`` row tiles, surplus programs
exit at once, and nothing waits on the host. Four kernels:

- ``_ffn_up_kernel``: ``act(x[gather] @ w1[e]) (* x[gather] @ w3[e])``: the gather of token rows
  is fused into the A load and the activation (SwiGLU: two accumulators) into the epilogue; stores
  the pre-activations (for backward) and the activation.
- ``_grouped_mm_kernel``: ``C[scatter] = A1 @ B1[e] (+ A2 @ B2[e])``: the down projection (scatter
  of each row to its (token, choice) slot fused into the store), ``dh = dys @ w2[e]^T`` and dX of
  the up projection.
- ``_act_bwd_rows_kernel``: the activation's backward (``dg``, ``du`` from ``dh``, ``g``, ``u``),
  memory-bound. Fused into the ``dh`` GEMM's epilogue it ran at 370-390 TFLOP/s against 590 for
  the GEMM plus this kernel (H200, T=16384, H=4096, F=14336, E=8): the epilogue's loads of ``g``
  and ``u`` stall a program that holds a whole SM.
- ``_wgrad_kernel``: ``dW[e] = A^T @ B`` over the rows of expert ``e``, both operands contiguous
  expert-sorted rows: fp32 accumulation, one store per tile, no atomics (bitwise deterministic).
- ``_gather_rows_kernel``: token rows into expert order (optionally times the combine weight), for
  the backward's weight-gradient GEMMs. A gather inside their reduction loop cannot be
  software-pipelined (its addresses depend on a load of the same step): 330-360 TFLOP/s against
  480-520 on pre-gathered rows, for one extra pass over ``T k`` rows (0.16 ms at T k = 32768,
  H = 4096).

All row and expert offsets are int64 before they meet a stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_moe.kernels.availability import interpreter_enabled

ACT_IDS = {"swiglu": 0, "gelu": 1, "relu": 2}


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


INTERPRET_CONFIG = GemmConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=1)


def pick_config(kind: str, n_cols: int, rows_per_expert: float) -> GemmConfig:
    """Tile configuration for one launch (tuned on an H200, bf16; see docs/kernels.md).

    The choice depends on the weight shape and the average rows per expert only, so a new token
    count never recompiles a kernel.

    Args:
        kind: ``"up"``, ``"mm"``, ``"wgrad"`` (one accumulator) or ``"wgrad2"`` (two).
        n_cols: output columns.
        rows_per_expert: average rows per expert.
    """
    if interpreter_enabled():
        return INTERPRET_CONFIG
    block_m = 64 if rows_per_expert < 256 else 128
    if kind == "up":  # two accumulators (SwiGLU): 3 operand tiles per stage
        return GemmConfig(block_m, 128 if n_cols >= 128 else 64, 64, num_warps=8, num_stages=4)
    if kind == "wgrad":  # 392-495 TFLOP/s on the five benchmark shapes (tune_backward.py)
        return GemmConfig(128, 256, 64, num_warps=8, num_stages=3)
    if kind == "wgrad2":  # 476-555 on the last four shapes, 482 vs 502 for 128x128x64 s3 on the first
        return GemmConfig(128, 128, 32, num_warps=8, num_stages=5)
    if kind == "mm" and n_cols >= 256:
        return GemmConfig(block_m, 256, 64, num_warps=8, num_stages=3)
    return GemmConfig(block_m, 128 if n_cols >= 128 else 64, 64, num_warps=8, num_stages=4)


@triton.jit
def _expert_tile(pid_m, counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert of row tile ``pid_m``, its first row, and the end of the expert's rows (E if none)."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(tiles, axis=0) <= pid_m).to(tl.int32), axis=0)
    before = offs_e < e
    row_start = tl.sum(tl.where(before, counts, 0), axis=0)
    tile_start = tl.sum(tl.where(before, tiles, 0), axis=0)
    row_end = row_start + tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    return e, row_start + (pid_m - tile_start) * BLOCK_M, row_end


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Group row tiles so that consecutive programs share B columns and A rows in L2."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _row_tile(num_pid_m, counts_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """This program's expert (E if it has no tile), row tile and its mask, and column tile index."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, row0, row_end = _expert_tile(pid_m, counts_ptr, E, BLOCK_M, BLOCK_E)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end, pid_n


@triton.jit
def _mm_loop(a_ptr, b_ptr, a_offs, b_offs, acc, R, row_mask, n_mask, offs_k, stride_bk,
             EVEN_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``acc += A[rows, :R] @ B[:R, cols]`` in BLOCK_K steps."""
    for k0 in range(0, R, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr + a_offs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptr + b_offs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k + k0 < R
            a = tl.load(a_ptr + a_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + b_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_offs += BLOCK_K
        b_offs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _ffn_up_kernel(
    x_ptr, row_pair_ptr, w1_ptr, w3_ptr, g_ptr, u_ptr, h_ptr, counts_ptr,
    E, R, N, TOP_K, num_pid_m, stride_x, stride_we, stride_wk, stride_out,
    GATHER: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    e, rows, row_mask, pid_n = _row_tile(num_pid_m, counts_ptr, E, N, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    if e >= E:
        return
    if GATHER:
        pair = tl.load(row_pair_ptr + rows, mask=row_mask, other=0)
        src = pair // TOP_K
    else:
        src = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    w_offs = e.to(tl.int64) * stride_we + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :]
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT == 0:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b1 = tl.load(w1_ptr + w_offs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k + k0 < R
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b1 = tl.load(w1_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        if ACT == 0:
            if EVEN_K:
                b3 = tl.load(w3_ptr + w_offs, mask=n_mask[None, :], other=0.0)
            else:
                b3 = tl.load(w3_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_offs += BLOCK_K * stride_wk
    if ACT == 0:
        h = acc1 * tl.sigmoid(acc1) * acc3
    elif ACT == 1:
        h = 0.5 * acc1 * (1.0 + tl.math.erf(acc1 * 0.7071067811865476))
    else:
        h = tl.maximum(acc1, 0.0)
    out_offs = rows.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    dtype = h_ptr.dtype.element_ty
    tl.store(g_ptr + out_offs, acc1.to(dtype), mask=out_mask)
    if ACT == 0:
        tl.store(u_ptr + out_offs, acc3.to(dtype), mask=out_mask)
    tl.store(h_ptr + out_offs, h.to(dtype), mask=out_mask)


@triton.jit
def _grouped_mm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, c_ptr, row_pair_ptr, counts_ptr,
    E, R, N, num_pid_m, stride_a, stride_be, stride_bk, stride_bn, stride_c,
    DUAL: tl.constexpr, SCATTER: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    e, rows, row_mask, pid_n = _row_tile(num_pid_m, counts_ptr, E, N, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    if e >= E:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_offs = rows.to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_offs = e.to(tl.int64) * stride_be + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _mm_loop(a1_ptr, b1_ptr, a_offs, b_offs, acc, R, row_mask, n_mask, offs_k, stride_bk,
                   EVEN_K, PRECISION, BLOCK_K)  # fmt: skip
    if DUAL:
        # A second product into the same accumulator, after the first (one operand pair in shared
        # memory at a time, so the pipeline keeps its depth).
        acc = _mm_loop(a2_ptr, b2_ptr, a_offs, b_offs, acc, R, row_mask, n_mask, offs_k, stride_bk,
                       EVEN_K, PRECISION, BLOCK_K)  # fmt: skip
    if SCATTER:
        dst = tl.load(row_pair_ptr + rows, mask=row_mask, other=0)
    else:
        dst = rows
    c_ptrs = c_ptr + dst.to(tl.int64)[:, None] * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _kept_rows(counts_ptr, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's block of expert-sorted rows, its mask (``row < sum(counts)``), and whether any row is in it."""
    offs_e = tl.arange(0, BLOCK_E)
    num_rows = tl.sum(tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), axis=0)
    r0 = tl.program_id(0) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    return rows, rows < num_rows, r0 < num_rows


@triton.jit
def _act_bwd_rows_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, counts_ptr, E, N, stride,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """The activation's backward alone, on the first ``sum(counts)`` rows (memory-bound)."""
    rows, r_mask, any_rows = _kept_rows(counts_ptr, E, BLOCK_R, BLOCK_E)
    if not any_rows:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = r_mask[:, None] & (offs_n < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride + offs_n[None, :]
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = dg_ptr.dtype.element_ty
    if ACT == 0:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(du_ptr + offs, (dh * g * sig).to(dtype), mask=mask)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        tl.store(dg_ptr + offs, (dh * (cdf + g * pdf)).to(dtype), mask=mask)
    else:
        tl.store(dg_ptr + offs, tl.where(g > 0.0, dh, 0.0).to(dtype), mask=mask)


@triton.jit
def _wgrad_kernel(
    a_ptr, b1_ptr, b2_ptr, c1_ptr, c2_ptr, counts_ptr,
    E, M, N, stride_a, stride_b, stride_ce, stride_cm,
    DUAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    e = pid // (num_pid_m * num_pid_n)
    pid_m, pid_n = _swizzle(pid % (num_pid_m * num_pid_n), num_pid_m, num_pid_n, GROUP_M)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    row_start = tl.sum(tl.where(offs_e < e, counts, 0), axis=0)
    row_end = row_start + tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DUAL:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Both operands are contiguous expert-sorted rows (a gathered operand here could not be
    # software-pipelined: its addresses would depend on a load in the same loop step).
    a_ptrs = a_ptr + (row_start + offs_k).to(tl.int64)[:, None] * stride_a + offs_m[None, :]
    b_offs = (row_start + offs_k).to(tl.int64)[:, None] * stride_b + offs_n[None, :]
    for r0 in range(row_start, row_end, BLOCK_K):
        r_mask = r0 + offs_k < row_end
        a = tl.load(a_ptrs, mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b1_ptr + b_offs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc1 = tl.dot(tl.trans(a), b, acc1, input_precision=PRECISION)
        if DUAL:
            b = tl.load(b2_ptr + b_offs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc2 = tl.dot(tl.trans(a), b, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_a
        b_offs += BLOCK_K * stride_b
    c_offs = e.to(tl.int64) * stride_ce + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(c1_ptr + c_offs, acc1.to(c1_ptr.dtype.element_ty), mask=mask)
    if DUAL:
        tl.store(c2_ptr + c_offs, acc2.to(c2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows_kernel(
    src_ptr, row_pair_ptr, scale_ptr, counts_ptr, out_ptr, E, H, TOP_K, stride_src, stride_out,
    SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    rows, r_mask, any_rows = _kept_rows(counts_ptr, E, BLOCK_R, BLOCK_E)
    if not any_rows:
        return
    pair = tl.load(row_pair_ptr + rows, mask=r_mask, other=0)
    src = (pair // TOP_K).to(tl.int64)
    if SCALED:
        s = tl.load(scale_ptr + pair, mask=r_mask, other=0.0)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = r_mask[:, None] & (offs_h < H)[None, :]
        v = tl.load(src_ptr + src[:, None] * stride_src + offs_h[None, :], mask=mask, other=0.0)
        if SCALED:
            v = v.to(tl.float32) * s[:, None]
        out_offs = rows.to(tl.int64)[:, None] * stride_out + offs_h[None, :]
        tl.store(out_ptr + out_offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    # float32 operands get a true float32 product (the torch reference does not use TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_e(E: int) -> int:
    return max(2, 1 << (E - 1).bit_length())


def _row_tiles(max_rows: int, E: int, block_m: int) -> int:
    return triton.cdiv(max_rows, block_m) + min(E, max_rows)


def ffn_up(
    x: Tensor, row_pair: Tensor | None, top_k: int, w1_EHF: Tensor, w3_EHF: Tensor | None,
    counts_E: Tensor, max_rows: int, activation: str, config: GemmConfig | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
    """Up projection with the activation fused: ``(g, u, h)`` rows in expert-sorted order.

    Args:
        x: ``[T, H]`` tokens (``row_pair`` given: row ``r`` reads token ``row_pair[r] // top_k``) or
            ``[N, H]`` expert-sorted rows (``row_pair`` None).
        row_pair: ``[>= N]`` int32 pair of each row, or None.
        top_k: K.
        w1_EHF: ``[E, H, F]``.
        w3_EHF: ``[E, H, F]`` (SwiGLU) or None.
        counts_E: ``[E]`` int32 rows per expert.
        max_rows: an upper bound on ``N`` (the allocation; only the first ``N`` rows are written).
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        config: tile configuration (default: :func:`pick_config`).

    Returns:
        ``g_NF`` (``x @ w1``), ``u_NF`` (``x @ w3``, SwiGLU only) and ``h_NF`` (the activation).
    """
    E, H, F = w1_EHF.shape
    cfg = config or pick_config("up", F, max_rows / max(E, 1))
    g = x.new_empty(max_rows, F)
    h = torch.empty_like(g)
    u = torch.empty_like(g) if w3_EHF is not None else None
    num_pid_m = _row_tiles(max_rows, E, cfg.block_m)
    grid = (num_pid_m * triton.cdiv(F, cfg.block_n),)
    if grid[0] == 0:
        return g, u, h
    _ffn_up_kernel[grid](
        x, row_pair if row_pair is not None else counts_E,
        w1_EHF, w3_EHF if w3_EHF is not None else w1_EHF, g, u if u is not None else g, h, counts_E,
        E, H, F, top_k, num_pid_m, x.stride(0), w1_EHF.stride(0), w1_EHF.stride(1), g.stride(0),
        GATHER=row_pair is not None, ACT=ACT_IDS[activation], EVEN_K=H % cfg.block_k == 0,
        PRECISION=_precision(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, BLOCK_E=_block_e(E), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return g, u, h


def grouped_mm(
    a1: Tensor, b1_ERN: Tensor, counts_E: Tensor, out: Tensor, row_pair: Tensor | None = None,
    a2: Tensor | None = None, b2_ERN: Tensor | None = None, config: GemmConfig | None = None,
) -> Tensor:  # fmt: skip
    """``out[dst(r)] = a1[r] @ b1[e] (+ a2[r] @ b2[e])`` over expert-contiguous rows.

    Args:
        a1: ``[>= N, R]`` rows in expert-sorted order (row stride any, unit column stride).
        b1_ERN: ``[E, R, N]`` per-expert matrices, any strides (a transposed view is fine).
        counts_E: ``[E]`` int32 rows per expert.
        out: ``[*, N]`` output; row ``r`` goes to ``row_pair[r]`` if given, else to ``r``.
        row_pair: optional ``[>= N]`` int32 scatter index.
        a2: optional second A, summed into the same output (dX of SwiGLU).
        b2_ERN: the second B.
        config: tile configuration.

    Returns:
        ``out``.
    """
    E, R, N = b1_ERN.shape
    max_rows = a1.shape[0]
    cfg = config or pick_config("mm", N, max_rows / max(E, 1))
    num_pid_m = _row_tiles(max_rows, E, cfg.block_m)
    grid = (num_pid_m * triton.cdiv(N, cfg.block_n),)
    dual = a2 is not None
    if grid[0] == 0:
        return out
    assert b2_ERN is None or b2_ERN.stride() == b1_ERN.stride()
    _grouped_mm_kernel[grid](
        a1, b1_ERN, a2 if dual else a1, b2_ERN if dual else b1_ERN, out,
        row_pair if row_pair is not None else counts_E, counts_E,
        E, R, N, num_pid_m, a1.stride(0), b1_ERN.stride(0), b1_ERN.stride(1), b1_ERN.stride(2), out.stride(0),
        DUAL=dual, SCATTER=row_pair is not None, EVEN_K=R % cfg.block_k == 0, PRECISION=_precision(a1.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        BLOCK_E=_block_e(E), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def act_bwd(
    dys: Tensor, w2t_EHF: Tensor, g: Tensor, u: Tensor | None, counts_E: Tensor, activation: str,
    config: GemmConfig | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Gradients of the up projection's outputs: ``dh = dys @ w2[e]^T`` through the activation.

    A grouped GEMM stores ``dh``, then a memory-bound kernel applies the activation's backward
    (measured faster than the same in the GEMM's epilogue; see the module docstring).

    Args:
        dys: ``[>= N, H]`` output gradient of each expert-sorted row (times its combine weight).
        w2t_EHF: ``[E, H, F]``, the down-projection weight transposed per expert (any strides).
        g: ``[>= N, F]`` saved ``x @ w1``.
        u: ``[>= N, F]`` saved ``x @ w3`` (SwiGLU) or None.
        counts_E: ``[E]`` int32 rows per expert.
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        config: tile configuration of the GEMM.

    Returns:
        ``dg`` and ``du`` (None unless SwiGLU), shaped like ``g``.
    """
    E, F = w2t_EHF.shape[0], w2t_EHF.shape[2]
    max_rows = g.shape[0]
    dh = grouped_mm(dys, w2t_EHF, counts_E, torch.empty_like(g), config=config)
    dg = dh  # written in place: each element of dg depends on the same element of dh only
    du = torch.empty_like(g) if u is not None else None
    block_r, block_n = (16, 16) if interpreter_enabled() else (32, 128)
    grid = (triton.cdiv(max_rows, block_r), triton.cdiv(F, block_n))
    if grid[0] > 0:
        _act_bwd_rows_kernel[grid](
            dh, g, u if u is not None else g, dg, du if du is not None else dg, counts_E, E, F, g.stride(0),
            ACT=ACT_IDS[activation], BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_E=_block_e(E), num_warps=4,
        )  # fmt: skip
    return dg, du


def wgrad(
    a: Tensor, b1: Tensor, counts_E: Tensor, out_dtype: torch.dtype, b2: Tensor | None = None,
    config: GemmConfig | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Per-expert weight gradient ``dW[e] = A_e^T @ B_e`` over the rows of expert ``e``.

    Args:
        a: ``[>= N, M]`` expert-sorted rows.
        b1: ``[>= N, N]`` expert-sorted rows.
        counts_E: ``[E]`` int32 rows per expert.
        out_dtype: dtype of the result (the parameter's dtype; accumulation is float32).
        b2: optional second B sharing A (``dW1`` and ``dW3`` in one pass over ``x``).
        config: tile configuration.

    Returns:
        ``[E, M, N]`` gradients for ``b1`` and ``b2`` (None without ``b2``).
    """
    E = counts_E.shape[0]
    M, N = a.shape[1], b1.shape[1]
    cfg = config or pick_config("wgrad" if b2 is None else "wgrad2", N, a.shape[0] / max(E, 1))
    c1 = torch.empty(E, M, N, device=a.device, dtype=out_dtype)
    c2 = torch.empty_like(c1) if b2 is not None else None
    grid = (E * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _wgrad_kernel[grid](
        a, b1, b2 if b2 is not None else b1, c1, c2 if c2 is not None else c1, counts_E,
        E, M, N, a.stride(0), b1.stride(0), c1.stride(0), c1.stride(1),
        DUAL=b2 is not None, PRECISION=_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, BLOCK_E=_block_e(E), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return c1, c2


def gather_rows(
    src: Tensor, row_pair: Tensor, top_k: int, counts_E: Tensor, max_rows: int, scale: Tensor | None = None
) -> Tensor:
    """Token rows in expert-sorted order: ``out[r] = src[row_pair[r] // top_k] (* scale[row_pair[r]])``.

    Only the first ``N = sum(counts_E)`` rows are written (read on the device: no host sync).

    Args:
        src: ``[T, H]`` token rows (unit column stride).
        row_pair: ``[>= N]`` int32 pair of each row.
        top_k: K.
        counts_E: ``[E]`` int32 rows per expert.
        max_rows: rows to allocate (an upper bound on ``N``).
        scale: optional ``[T * K]`` float32 factor per pair (the combine weight), applied in float32
            before rounding to ``src``'s dtype.

    Returns:
        ``[max_rows, H]`` in ``src``'s dtype.
    """
    H = src.shape[1]
    out = src.new_empty(max_rows, H)
    E = counts_E.shape[0]
    block_r, block_h = (16, 16) if interpreter_enabled() else (32, 256)
    grid = (triton.cdiv(max_rows, block_r),)
    if grid[0] == 0:
        return out
    _gather_rows_kernel[grid](
        src, row_pair, scale if scale is not None else src, counts_E, out, E, H, top_k, src.stride(0), out.stride(0),
        SCALED=scale is not None, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_E=_block_e(E), num_warps=4,
    )  # fmt: skip
    return out
