"""Expert gradients: reduction over the expert-data-parallel group and norm clipping.

Non-expert gradients are averaged over the world by DDP. Expert gradients are excluded from DDP:
a hook scales each one by ``1 / P`` as it is computed and, after the backward of the step that
synchronises, they are averaged over the expert-data-parallel (EDP) group of ``D = W / P`` ranks.
The result is the DESIGN rule (DESIGN.md, "Parallel layout"): summed over the EDP group and divided
by the world size, so that any expert-parallel size computes the update of one process on the
global batch. The gradient norm counts every
expert shard once: ``||g||^2 = ||g_dense||^2 + sum over the EP group of ||g_local_experts||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_moe.moe.layer import moe_layers

EXPERT_WEIGHT_NAMES = ("w1", "w2", "w3")


def expert_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The expert weights of every MoE layer in ``module``, with their qualified names.

    Only the routed experts (``<layer>.experts.w1/w2/w3``) are expert-parallel; the router and any
    shared experts are ordinary data-parallel parameters.

    Args:
        module: a model holding :class:`~lightning_moe.MoE` layers.

    Returns:
        ``(name, parameter)`` pairs in registration order.
    """
    out = []
    for layer_name, layer in moe_layers(module):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for weight_name in EXPERT_WEIGHT_NAMES:
            param = getattr(layer.experts, weight_name, None)
            if param is not None:
                out.append((prefix + weight_name, param))
    return out


def scale_expert_gradients(params: Sequence[nn.Parameter], expert_parallel_size: int) -> list[RemovableHandle]:
    """Scale every gradient reaching an expert weight by ``1 / P`` (hooks; remove them at teardown).

    Together with the mean over the EDP group in :func:`reduce_expert_gradients` this gives the
    DESIGN rule, ``sum over the EDP group / W`` (``W = D * P``), while staying a linear, DDP-like
    reduction: gradients accumulated over several synchronised backwards are reduced correctly.

    Args:
        params: this rank's expert parameters.
        expert_parallel_size: P; with ``P == 1`` no hook is registered.

    Returns:
        The hook handles.
    """
    if expert_parallel_size == 1:
        return []
    scale = 1.0 / expert_parallel_size
    return [param.register_hook(partial(_scale_grad, scale)) for param in params]


def _scale_grad(scale: float, grad: Tensor) -> Tensor:
    return grad * scale


def reduce_expert_gradients(params: Sequence[nn.Parameter], group: object | None, group_size: int) -> None:
    """Average expert gradients over the expert-data-parallel group, in place.

    A parameter without a gradient (no token reached this rank's experts of that layer) gets a zero
    gradient first, so that every rank of the group takes part in the same all-reduces. With the
    ``1 / P`` of :func:`scale_expert_gradients` the result is ``sum over the EDP group / W``.

    Args:
        params: this rank's expert parameters, in the same order on every rank.
        group: the expert-data-parallel process group; ``None`` when it holds one rank.
        group_size: D, ranks in the group.
    """
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    if not grads or group is None or group_size == 1:
        return
    # In place on each (large, stacked) gradient: no flat copy; all in flight at once.
    works = [dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group, async_op=True) for grad in grads]
    for work in works:
        work.wait()
    torch._foreach_div_(grads, float(group_size))


def clip_grad_norm_(
    params: Iterable[nn.Parameter],
    max_norm: float,
    expert_param_ids: set[int],
    expert_parallel_group: object | None,
    norm_type: float = 2.0,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for expert-parallel models.

    The total norm counts the replicated (non-expert) gradients once and every expert shard once:
    the local expert part is reduced over the expert-parallel group, whose ranks hold disjoint
    experts. The clip coefficient is torch's, ``min(1, max_norm / (total + 1e-6))``.

    Args:
        params: every parameter of the optimizer; those without gradients are skipped.
        max_norm: the norm to clip to.
        expert_param_ids: ``id()`` of the expert parameters among ``params``.
        expert_parallel_group: the EP group (``None`` without expert parallelism).
        norm_type: the p of the p-norm; ``math.inf`` for the max norm.

    Returns:
        The total norm (float32 scalar tensor) before clipping.
    """
    params = [p for p in params if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in expert_param_ids]
    expert = [p.grad for p in params if id(p) in expert_param_ids]
    device = params[0].grad.device if params else torch.device("cpu")
    dense_part = _norm_part(dense, norm_type, device)
    expert_part = _norm_part(expert, norm_type, device)
    if expert_parallel_group is not None:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(expert_part, op=op, group=expert_parallel_group)
    if math.isinf(norm_type):
        total = torch.maximum(dense_part, expert_part)
    else:
        total = (dense_part + expert_part) ** (1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = dense + expert
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def _norm_part(grads: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """``max |g|`` for the inf-norm, else ``sum ||g||_p^p``, as a float32 scalar on ``device``."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32) for g in grads])
    if math.isinf(norm_type):
        return norms.max().to(device)
    return (norms**norm_type).sum().to(device)


__all__ = [
    "EXPERT_WEIGHT_NAMES",
    "clip_grad_norm_",
    "expert_parameters",
    "reduce_expert_gradients",
    "scale_expert_gradients",
]
