"""AdamW with per-step warmup + inverse-square-root or cosine learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

SCHEDULES = ("inverse_sqrt", "cosine", "constant")


def lr_multiplier(
    schedule: str, warmup_steps: int, max_steps: int | None = None, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The factor on the peak learning rate at optimizer step ``step`` (0-based).

    - ``"inverse_sqrt"``: linear warmup to 1 over ``warmup_steps``, then ``sqrt(warmup_steps / s)``
      (fairseq's schedule; ``s`` is the 1-based step).
    - ``"cosine"``: linear warmup, then cosine decay from 1 to ``min_lr_ratio`` at ``max_steps``.
    - ``"constant"``: linear warmup, then 1.

    Args:
        schedule: one of ``"inverse_sqrt"``, ``"cosine"``, ``"constant"``.
        warmup_steps: linear warmup length (0: none).
        max_steps: total optimizer steps; required by ``"cosine"``.
        min_lr_ratio: final factor of ``"cosine"``.

    Returns:
        ``step -> factor``, usable with ``torch.optim.lr_scheduler.LambdaLR``.

    Raises:
        ValueError: on an unknown schedule or a cosine schedule without ``max_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if schedule == "cosine" and (max_steps is None or max_steps < 1):
        raise ValueError(
            f"schedule='cosine' needs max_steps >= 1 (got {max_steps}); pass max_steps, or set the "
            "Trainer's max_steps/max_epochs so that it can be estimated"
        )

    def factor(step: int) -> float:
        s = step + 1
        if s <= warmup_steps:
            return s / warmup_steps
        if schedule == "inverse_sqrt":
            return math.sqrt(max(warmup_steps, 1) / s)
        if schedule == "cosine":
            assert max_steps is not None
            progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def adamw_with_schedule(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    schedule: str,
    warmup_steps: int,
    max_steps: int | None,
    min_lr_ratio: float = 0.0,
) -> OptimizerLRSchedulerConfig:
    """AdamW over ``module``'s parameters with a per-step schedule, in Lightning's return format.

    Weight decay applies to matrices (embeddings, projections, experts, routers), not to biases
    and LayerNorm parameters.

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(schedule, warmup_steps, max_steps, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


__all__ = ["SCHEDULES", "adamw_with_schedule", "lr_multiplier"]


def adamw_from_hparams(
    module: nn.Module, hparams: Mapping[str, Any], estimated_steps: Callable[[], int]
) -> OptimizerLRSchedulerConfig:
    """:func:`adamw_with_schedule` configured from a LightningModule's optimizer hyper-parameters.

    Args:
        module: the model whose parameters are optimized.
        hparams: holds ``lr``, ``weight_decay``, ``betas``, ``adam_eps``, ``schedule``,
            ``warmup_steps``, ``max_steps`` and ``min_lr_ratio``.
        estimated_steps: the run's length in optimizer steps (e.g. the Trainer's
            ``estimated_stepping_batches``), asked only for a cosine schedule without ``max_steps``.

    Returns:
        The optimizer and its per-step scheduler, as ``configure_optimizers`` returns them.
    """
    max_steps = hparams["max_steps"]
    if hparams["schedule"] == "cosine" and max_steps is None:
        max_steps = int(estimated_steps())
    return adamw_with_schedule(
        module, lr=hparams["lr"], weight_decay=hparams["weight_decay"], betas=tuple(hparams["betas"]),
        eps=hparams["adam_eps"], schedule=hparams["schedule"], warmup_steps=hparams["warmup_steps"],
        max_steps=max_steps, min_lr_ratio=hparams["min_lr_ratio"],
    )  # fmt: skip
