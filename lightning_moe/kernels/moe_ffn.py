"""Autograd Functions for the expert FFN on the fused grouped GEMMs.

Legend: T tokens, H hidden, F ffn, E (local) experts, K top-k, P = T * K (token, choice) slots,
N rows in expert-sorted order (``row_pair[r]`` is the slot of row ``r``), R received rows (EP).

``moe_experts`` (one process, every expert local): gather token rows in the up projection's A
load, scatter each output row to its slot in the down projection's store, and a deterministic
weighted combine over the K slots. Backward: ``dw`` from the slots; the output gradient's rows
(times the combine weight) and the token rows gathered once into expert order; ``dh`` as a
grouped GEMM followed by the activation's backward; ``dW2``/``dW1``/``dW3`` as per-expert grouped
GEMMs over contiguous rows (fp32 accumulation, one store); ``dx`` through the same scatter + combine.

``grouped_ffn`` (expert parallelism): the same kernels on rows that the dispatcher's all-to-all
already brought into expert-contiguous order (no gather, no scatter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.kernels.combine import combine, combine_weights_grad
from lightning_moe.kernels.grouped_gemm import act_bwd, ffn_up, gather_rows, grouped_mm, wgrad


def _cast(w: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if w is None else w.to(dtype).contiguous()


def _t(w: Tensor | None) -> Tensor | None:
    """``w[e]^T`` for every expert as a strided view (no copy).

    Measured on an H200 (docs/kernels.md): a contiguous transposed copy makes dX 3% faster
    (11.3 vs 11.7 ms at T=16384, H=4096, F=14336, E=8) and costs 3.1 ms per weight.
    """
    return None if w is None else w.transpose(1, 2)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, weights_TK, w1_EHF, w3_EHF, w2_EFH, kept_TK, row_pair_P, counts_E, activation):  # type: ignore[override]
        T, K = kept_TK.shape
        P, H = T * K, x_TH.shape[1]
        x_TH = x_TH.contiguous()
        weights_P = weights_TK.float().contiguous().view(-1)
        w1, w3, w2 = (_cast(w, x_TH.dtype) for w in (w1_EHF, w3_EHF, w2_EFH))
        g_NF, u_NF, h_NF = ffn_up(x_TH, row_pair_P, K, w1, w3, counts_E, P, activation)
        slots_PH = x_TH.new_empty(P, H)
        if P > 0:
            grouped_mm(h_NF, w2, counts_E, slots_PH, row_pair=row_pair_P)
        y_TH = combine(slots_PH, kept_TK, weights_P.view(T, K), x_TH.dtype)
        ctx.save_for_backward(x_TH, weights_P, w1, w3, w2, kept_TK, row_pair_P, counts_E, g_NF, u_NF, h_NF, slots_PH)
        ctx.activation = activation
        ctx.param_dtypes = (w1_EHF.dtype, None if w3_EHF is None else w3_EHF.dtype, w2_EFH.dtype)
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):  # type: ignore[override]
        x_TH, weights_P, w1, w3, w2, kept_TK, row_pair_P, counts_E, g_NF, u_NF, h_NF, slots_PH = ctx.saved_tensors
        T, K = kept_TK.shape
        P, H = T * K, x_TH.shape[1]
        dy_TH = dy_TH.to(x_TH.dtype).contiguous()
        dtype1, dtype3, dtype2 = ctx.param_dtypes
        dweights = combine_weights_grad(dy_TH, slots_PH, kept_TK) if ctx.needs_input_grad[1] else None
        # The weight-gradient GEMMs reduce over rows: a row gather inside their main loop cannot be
        # software-pipelined (the gathered operand would wait on memory every step), so the token
        # rows are gathered once into expert order here (one pass over T k rows).
        dys_NH = gather_rows(dy_TH, row_pair_P, K, counts_E, P, scale=weights_P)  # w * dy[token]
        dg_NF, du_NF = act_bwd(dys_NH, _t(w2), g_NF, u_NF, counts_E, ctx.activation)
        dw2, _ = wgrad(h_NF, dys_NH, counts_E, dtype2)
        del dys_NH
        dx_slots_PH = x_TH.new_empty(P, H)
        w1_t, w3_t = _t(w1), _t(w3)
        if P > 0:
            grouped_mm(dg_NF, w1_t, counts_E, dx_slots_PH, row_pair=row_pair_P, a2=du_NF, b2_ERN=w3_t)
        dx_TH = combine(dx_slots_PH, kept_TK, None, x_TH.dtype)
        del dx_slots_PH
        xs_NH = gather_rows(x_TH, row_pair_P, K, counts_E, P)
        dw1, dw3 = wgrad(xs_NH, dg_NF, counts_E, dtype1, b2=du_NF)
        if dw3 is not None and dtype3 != dtype1:
            dw3 = dw3.to(dtype3)
        return dx_TH, dweights, dw1, dw3, dw2, None, None, None, None


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RH, w1_EHF, w3_EHF, w2_EFH, counts_E, activation):  # type: ignore[override]
        R, H = rows_RH.shape
        rows_RH = rows_RH.contiguous()
        w1, w3, w2 = (_cast(w, rows_RH.dtype) for w in (w1_EHF, w3_EHF, w2_EFH))
        g_RF, u_RF, h_RF = ffn_up(rows_RH, None, 1, w1, w3, counts_E, R, activation)
        out_RH = rows_RH.new_empty(R, H)
        if R > 0:
            grouped_mm(h_RF, w2, counts_E, out_RH)
        ctx.save_for_backward(rows_RH, w1, w3, w2, counts_E, g_RF, u_RF, h_RF)
        ctx.activation = activation
        ctx.param_dtypes = (w1_EHF.dtype, None if w3_EHF is None else w3_EHF.dtype, w2_EFH.dtype)
        return out_RH

    @staticmethod
    def backward(ctx, dout_RH):  # type: ignore[override]
        rows_RH, w1, w3, w2, counts_E, g_RF, u_RF, h_RF = ctx.saved_tensors
        R, H = rows_RH.shape
        dout_RH = dout_RH.to(rows_RH.dtype).contiguous()
        dtype1, dtype3, dtype2 = ctx.param_dtypes
        dg_RF, du_RF = act_bwd(dout_RH, _t(w2), g_RF, u_RF, counts_E, ctx.activation)
        dw2, _ = wgrad(h_RF, dout_RH, counts_E, dtype2)
        dx_RH = rows_RH.new_empty(R, H)
        if R > 0:
            grouped_mm(dg_RF, _t(w1), counts_E, dx_RH, a2=du_RF, b2_ERN=_t(w3))
        dw1, dw3 = wgrad(rows_RH, dg_RF, counts_E, dtype1, b2=du_RF)
        if dw3 is not None and dtype3 != dtype1:
            dw3 = dw3.to(dtype3)
        return dx_RH, dw1, dw3, dw2, None, None


def moe_experts(
    x_TH: Tensor,
    weights_TK: Tensor,
    kept_TK: Tensor,
    row_pair_P: Tensor,
    counts_E: Tensor,
    w1_EHF: Tensor,
    w3_EHF: Tensor | None,
    w2_EFH: Tensor,
    activation: str = "swiglu",
) -> Tensor:
    """Expert FFN and weighted combine of routed tokens, all experts local (differentiable).

    Args:
        x_TH: ``[T, H]`` tokens in the compute dtype (float32, bfloat16 or float16).
        weights_TK: ``[T, K]`` float32 combine weights (0 where dropped).
        kept_TK: ``[T, K]`` bool, the pair has a row.
        row_pair_P: ``[T * K]`` int32; the first ``N`` entries are the slots of the expert-sorted rows.
        counts_E: ``[E]`` int32 rows per expert (sums to ``N``).
        w1_EHF: ``[E, H, F]``.
        w3_EHF: ``[E, H, F]`` for SwiGLU, else None.
        w2_EFH: ``[E, F, H]``.
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.

    Returns:
        ``y_TH = sum_k w[t, k] * expert_{e(t, k)}(x[t])`` in ``x_TH``'s dtype.
    """
    return _MoEExperts.apply(
        x_TH, weights_TK, w1_EHF, w3_EHF, w2_EFH, kept_TK, row_pair_P, counts_E.to(torch.int32), activation
    )


def grouped_ffn(
    rows_RH: Tensor, counts_E: Tensor, w1_EHF: Tensor, w3_EHF: Tensor | None, w2_EFH: Tensor, activation: str = "swiglu"
) -> Tensor:
    """Expert FFN on expert-contiguous rows (differentiable): rows of expert ``e`` through expert ``e``.

    Args:
        rows_RH: ``[R, H]`` rows grouped by expert.
        counts_E: ``[E]`` rows per expert (sums to ``R``).
        w1_EHF: ``[E, H, F]``.
        w3_EHF: ``[E, H, F]`` for SwiGLU, else None.
        w2_EFH: ``[E, F, H]``.
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.

    Returns:
        ``[R, H]``, row-aligned with ``rows_RH``.
    """
    return _GroupedFFN.apply(rows_RH, w1_EHF, w3_EHF, w2_EFH, counts_E.to(torch.int32), activation)
