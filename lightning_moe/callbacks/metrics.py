"""Expert-load statistics of one MoE layer, and a torchmetrics ``Metric`` that accumulates them.

Shape legend: E experts.

All statistics are computed from sums, so partial windows from several steps or ranks combine by
adding them; this is what lets :class:`ExpertLoadMetric` use ``dist_reduce_fx="sum"`` for every state
and lets :class:`~lightning_moe.callbacks.LoadBalanceMonitor` reduce all layers in one collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.moe import MoEStats

#: Names of the statistics returned by :func:`expert_load_statistics`, in logging order.
LOAD_STATISTICS: tuple[str, ...] = (
    "cv",
    "max_load",
    "min_load",
    "dead_fraction",
    "drop_fraction",
    "router_entropy",
    "aux_loss",
    "z_loss",
)

#: Statistics for which a *lower* value is the worse one (all others: higher is worse).
LOWER_IS_WORSE: frozenset[str] = frozenset({"min_load", "router_entropy"})


def expert_load_statistics(
    tokens_per_expert: Tensor,
    num_tokens: Tensor,
    dropped: Tensor,
    router_entropy_sum: Tensor,
    aux_loss_sum: Tensor,
    z_loss_sum: Tensor,
    num_updates: Tensor,
) -> dict[str, Tensor]:
    """Load-balance statistics of one MoE layer from summed routing counts.

    Every argument is a sum over the steps (and ranks) of a window, as kept by
    :class:`~lightning_moe.moe.MoEStats`. With no token in the window the statistics are NaN.

    Args:
        tokens_per_expert: ``[E]`` (token, choice) assignments per expert, before capacity dropping.
        num_tokens: Scalar, tokens routed.
        dropped: Scalar, (token, choice) assignments dropped by capacity.
        router_entropy_sum: Scalar, sum over tokens of the entropy of the router's distribution (nats).
        aux_loss_sum: Scalar, sum of the unweighted load-balance loss over ``num_updates`` forwards.
        z_loss_sum: Scalar, sum of the unweighted router z-loss over ``num_updates`` forwards.
        num_updates: Scalar, forwards summed into the window.

    Returns:
        Scalar tensors keyed by :data:`LOAD_STATISTICS`:

        - ``cv``: coefficient of variation (population std / mean) of tokens per expert; 0 is perfectly
          balanced, ``sqrt(E - 1)`` is every token on one expert;
        - ``max_load``, ``min_load``: the most and least loaded expert's tokens over the mean (1 is
          balanced);
        - ``dead_fraction``: fraction of experts that received no token;
        - ``drop_fraction``: fraction of (token, choice) assignments dropped by capacity;
        - ``router_entropy``: mean entropy of the router distribution per token, in nats (at most
          ``log(E)``);
        - ``aux_loss``, ``z_loss``: mean unweighted load-balance and z-loss per forward.
    """
    counts_E = tokens_per_expert
    mean = counts_E.mean()
    assignments = counts_E.sum()
    return {
        "cv": counts_E.std(correction=0) / mean,
        "max_load": counts_E.max() / mean,
        "min_load": counts_E.min() / mean,
        "dead_fraction": (counts_E == 0).to(counts_E.dtype).mean().masked_fill(assignments == 0, torch.nan),
        "drop_fraction": dropped / assignments,
        "router_entropy": router_entropy_sum / num_tokens,
        "aux_loss": aux_loss_sum / num_updates,
        "z_loss": z_loss_sum / num_updates,
    }


class ExpertLoadMetric(Metric):
    """Accumulates the routing statistics of one MoE layer and computes its load-balance statistics.

    Every state is a sum (``dist_reduce_fx="sum"``), so the metric syncs over ranks like any torchmetrics
    metric. Feed it the :attr:`~lightning_moe.MoE.last_stats` of a layer after each forward::

        metric = ExpertLoadMetric(num_experts=moe.num_experts)
        y = moe(x)
        metric.update(moe.last_stats)
        stats = metric.compute()  # {"cv": ..., "dead_fraction": ..., ...}
        self.log_dict({f"moe/{k}": v for k, v in stats.items()})

    The per-expert counts stay available as :attr:`tokens_per_expert` (``[E]``).

    Args:
        num_experts: Number of experts of the layer.
        **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: If ``num_experts`` is not a positive integer.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    tokens_per_expert: Tensor
    num_tokens: Tensor
    dropped: Tensor
    router_entropy_sum: Tensor
    aux_loss_sum: Tensor
    z_loss_sum: Tensor
    num_updates: Tensor

    def __init__(self, num_experts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} is not a positive integer; pass the layer's `num_experts`.")
        self.num_experts = num_experts
        self.add_state("tokens_per_expert", default=torch.zeros(num_experts), dist_reduce_fx="sum")
        for name in ("num_tokens", "dropped", "router_entropy_sum", "aux_loss_sum", "z_loss_sum", "num_updates"):
            self.add_state(name, default=torch.zeros(()), dist_reduce_fx="sum")

    def update(self, stats: MoEStats) -> None:
        """Adds the statistics of one forward of the layer.

        Args:
            stats: The layer's ``last_stats`` after a forward.

        Raises:
            ValueError: If ``stats.tokens_per_expert`` does not have ``num_experts`` entries.
        """
        if stats.tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"stats.tokens_per_expert has shape {tuple(stats.tokens_per_expert.shape)}, expected "
                f"({self.num_experts},); create the metric with num_experts={stats.tokens_per_expert.numel()}"
                " or feed it the stats of the layer it was made for."
            )
        self.tokens_per_expert += stats.tokens_per_expert
        self.num_tokens += stats.num_tokens
        self.dropped += stats.dropped
        self.router_entropy_sum += stats.router_entropy_sum
        self.aux_loss_sum += stats.aux_loss
        self.z_loss_sum += stats.z_loss
        self.num_updates += 1

    def compute(self) -> dict[str, Tensor]:
        """Statistics of everything added since the last reset; see :func:`expert_load_statistics`.

        Returns:
            Scalar tensors keyed by :data:`LOAD_STATISTICS`.
        """
        return expert_load_statistics(
            self.tokens_per_expert,
            self.num_tokens,
            self.dropped,
            self.router_entropy_sum,
            self.aux_loss_sum,
            self.z_loss_sum,
            self.num_updates,
        )
