"""Token-level losses for sequence models.

Legend: N tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def label_smoothed_nll(
    logits_NV: Tensor, target_N: Tensor, epsilon: float, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token label-smoothed cross-entropy and negative log-likelihood, in float32.

    The smoothed target puts ``1 - epsilon`` on the reference token and spreads ``epsilon``
    uniformly over all ``V`` tokens (PyTorch's ``F.cross_entropy(label_smoothing=...)``):
    ``loss = (1 - epsilon) * nll - epsilon * mean_v log p_v``.

    Args:
        logits_NV: unnormalised scores (any leading shape, flattened to ``[N, V]``).
        target_N: reference ids (same leading shape).
        epsilon: label smoothing in ``[0, 1)``.
        ignore_index: target id whose tokens count zero (the padding id).

    Returns:
        ``(loss_N, nll_N, mask_N)``: smoothed loss and NLL per token (0 at ignored tokens) and the
        bool mask of counted tokens, each with ``target_N``'s shape.
    """
    lprobs = torch.log_softmax(logits_NV.float(), dim=-1)
    mask = target_N != ignore_index
    safe_target = torch.where(mask, target_N, torch.zeros_like(target_N))
    nll = -lprobs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.mean(dim=-1)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    zero = torch.zeros((), device=nll.device)
    return torch.where(mask, loss, zero), torch.where(mask, nll, zero), mask


__all__ = ["label_smoothed_nll"]
