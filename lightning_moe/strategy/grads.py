"""Gradient-norm clipping over sharded parameters: every shard counted exactly once.

Under :class:`~lightning_moe.ExpertParallelStrategy` the parameters are DTensors on different
meshes (non-expert ones on the data-parallel dim, experts on the expert-parallel and
expert-data-parallel dims), so ``torch.nn.utils.clip_grad_norm_`` cannot stack their norms. Here
each rank adds up the squares of its local shards, weighted so that a replicated shard counts
once in total (a shard held by ``r`` ranks contributes ``1 / r`` on each), and one all-reduce over
the world gives the norm of the whole model. Plain tensors count as replicated on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.moe.experts import WEIGHT_NAMES as EXPERT_WEIGHT_NAMES
from lightning_moe.moe.layer import moe_layers


def expert_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The routed expert weights of every MoE layer in ``module``, with their qualified names.

    Only the routed experts (``<layer>.experts.w1/w2/w3``) are expert-parallel; the router and any
    shared experts are ordinary data-parallel parameters.
    """
    out = []
    for layer_name, layer in moe_layers(module):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for weight_name in EXPERT_WEIGHT_NAMES:
            param = getattr(layer.experts, weight_name, None)
            if param is not None:
                out.append((prefix + weight_name, param))
    return out


def _replicas(tensor: Tensor, world_size: int) -> int:
    """How many ranks hold the same local shard of ``tensor``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return world_size
    mesh = tensor.device_mesh
    # Shard and _StridedShard (FSDP2 over an expert-parallel DTensor) split a dim; is_shard() is
    # False for the latter, so count every placement that is neither replicated nor partial.
    shards = math.prod(
        mesh.size(d) for d, p in enumerate(tensor.placements) if not (p.is_replicate() or p.is_partial())
    )
    return world_size // shards


def grad_norm(params: Iterable[nn.Parameter], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients of ``params`` across every rank (a collective over the world).

    Args:
        params: parameters (plain tensors or DTensors); those without a gradient are skipped.
        norm_type: the p of the p-norm; ``math.inf`` for the max norm.

    Returns:
        A float32 scalar tensor on the gradients' device, the same on every rank.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if local.numel() == 0:
            continue
        norm = torch.linalg.vector_norm(local.detach(), norm_type, dtype=torch.float32).to(torch.float64)
        if math.isinf(norm_type):
            total = torch.maximum(total, norm.to(device))
        else:
            total = total + norm.to(device) ** norm_type / _replicas(grad, world)
    if distributed:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        if dist.get_backend() == "nccl" and total.device.type == "cpu":
            total = total.cuda()
        dist.all_reduce(total, op=op)
    total = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    return total.float().to(device)


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded models: the norm counts every shard once.

    The clip coefficient is torch's, ``min(1, max_norm / (total + 1e-6))``.

    Args:
        params: every parameter of the optimizer.
        max_norm: the norm to clip to.
        norm_type: the p of the p-norm; ``math.inf`` for the max norm.

    Returns:
        The total norm before clipping (float32 scalar tensor).
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            local.mul_(coef.to(local.device, local.dtype))
    return total


__all__ = ["EXPERT_WEIGHT_NAMES", "clip_grad_norm_", "expert_parameters", "grad_norm"]
