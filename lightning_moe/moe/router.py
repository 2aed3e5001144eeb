"""Top-k router with capacity, Random Token Selection, jitter, aux loss and z-loss.

Legend: T tokens, H hidden, E experts, K top-k, N = T * K (token, choice) pairs.

This is the plain PyTorch reference of routing (the oracle the Triton router is tested
against). Semantics in capacity mode with RTS and jitter off are GShard's and DeepSpeed's:
``capacity = max(min_capacity, ceil(T * K / E * capacity_factor))``; first choices take slots
before second choices, earlier tokens before later ones. With Random Token Selection the
choice levels keep their priority (all first choices before any second choice) but, inside
one level, the tokens an over-full expert keeps are a uniformly random subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class RoutingResult:
    """What the router decided for a flat batch of ``T`` tokens.

    Attributes:
        expert_indices: ``[T, K]`` long, the chosen global expert of each choice.
        weights: ``[T, K]`` combine weights; 0 where the choice was dropped or the token is padding.
        kept: ``[T, K]`` bool, the choice got a capacity slot (False for padding tokens).
        tokens_per_expert: ``[E]`` float32 count of (token, choice) assignments before dropping.
        aux_loss: unweighted load-balancing loss (differentiable through the router).
        z_loss: unweighted router z-loss (differentiable through the router).
        probs: ``[T, E]`` float32 router probabilities.
        entropy_sum: sum over non-padding tokens of the router distribution's entropy (detached).
        num_tokens: number of non-padding tokens (float32 scalar tensor).
        capacity: slots per expert, or ``None`` in dropless mode.
    """

    expert_indices: Tensor
    weights: Tensor
    kept: Tensor
    tokens_per_expert: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    probs: Tensor
    entropy_sum: Tensor
    num_tokens: Tensor
    capacity: int | None


def compute_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ``max(min_capacity, ceil(T * K / E * capacity_factor))``."""
    return max(min_capacity, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def capacity_positions(
    expert_indices_TK: Tensor, valid_T: Tensor, num_experts: int, priority_T: Tensor | None
) -> Tensor:
    """Slot position of every (token, choice) pair inside its expert, in priority order.

    Priority: choice level first (all first choices before any second choice), then token order
    (``priority_T`` replaces the position of a token inside a level, e.g. a random permutation for
    RTS). Padding tokens get position ``T * K`` (never kept).

    Args:
        expert_indices_TK: ``[T, K]`` chosen experts.
        valid_T: ``[T]`` bool, token is routed.
        num_experts: E.
        priority_T: ``[T]`` long permutation of ``range(T)`` or ``None`` for token order.

    Returns:
        ``[T, K]`` long positions (0-based) within each expert's queue.
    """
    T, K = expert_indices_TK.shape
    device = expert_indices_TK.device
    order_T = torch.arange(T, device=device) if priority_T is None else priority_T
    level_K = torch.arange(K, device=device)
    # One unique sort key per pair: expert-major, then choice level, then token priority.
    # Padding pairs are pushed past every expert (key >= E * K * T).
    key_TK = (expert_indices_TK * K + level_K[None, :]) * T + order_T[:, None]
    key_TK = torch.where(valid_T[:, None], key_TK, key_TK + num_experts * K * T)
    key_N = key_TK.reshape(-1)
    sort_N = torch.argsort(key_N)
    experts_sorted_N = expert_indices_TK.reshape(-1)[sort_N]
    valid_sorted_N = valid_T[:, None].expand(T, K).reshape(-1)[sort_N]
    counts_E = torch.bincount(experts_sorted_N[valid_sorted_N], minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(T * K, device=device) - starts_E[experts_sorted_N]
    rank_N = torch.where(valid_sorted_N, rank_N, torch.full_like(rank_N, T * K))
    positions_N = torch.empty_like(rank_N)
    positions_N[sort_N] = rank_N
    return positions_N.view(T, K)


class Router(nn.Module):
    """Bias-free linear gate, softmax, top-k and capacity assignment.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: experts per token, in ``[1, E]``.
        capacity_factor: slots per expert relative to a perfectly balanced load; ``None`` is dropless.
        eval_capacity_factor: capacity factor outside training; ``None`` (the default) is dropless.
        min_capacity: lower bound on slots per expert in capacity mode.
        random_token_selection: keep a uniformly random subset of an over-full expert's tokens.
        router_jitter: multiplicative input jitter epsilon (training only); 0 turns it off.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        random_token_selection: bool = True,
        router_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.random_token_selection = random_token_selection
        self.router_jitter = router_jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal init so that early routing is close to uniform."""
        nn.init.normal_(self.weight, std=self.hidden_size**-0.5 * 0.1)

    def active_capacity_factor(self) -> float | None:
        """The capacity factor in force for the current mode: ``capacity_factor`` in training, ``eval_capacity_factor`` in eval.

        ``None`` is dropless, so by default evaluation and decoding drop no token and a sentence's
        output does not depend on the other sentences of its batch.
        """
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x_TH: Tensor, padding_mask_T: Tensor | None = None) -> RoutingResult:
        """Route a flat batch of tokens.

        Args:
            x_TH: ``[T, H]`` tokens.
            padding_mask_T: optional ``[T]`` bool, True marks padding tokens (not routed, not counted).

        Returns:
            The :class:`RoutingResult`.
        """
        T = x_TH.shape[0]
        E, K = self.num_experts, self.top_k
        valid_T = torch.ones(T, dtype=torch.bool, device=x_TH.device) if padding_mask_T is None else ~padding_mask_T
        # fp32 router math (fp64 stays fp64), whatever the input or autocast dtype.
        router_dtype = torch.promote_types(x_TH.dtype, torch.float32)
        x_f = x_TH.to(router_dtype)
        if self.training and self.router_jitter > 0:
            eps = self.router_jitter
            x_f = x_f * torch.empty_like(x_f).uniform_(1.0 - eps, 1.0 + eps)
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = x_f @ self.weight.to(router_dtype).t()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_probs_TK, expert_indices_TK = torch.topk(probs_TE, K, dim=-1)

        valid_f_T = valid_T.to(router_dtype)
        num_tokens = valid_f_T.sum()
        denom = num_tokens.clamp_min(1.0)
        # Counts of whole assignments are exact in floating point, so scatter_add's order is irrelevant;
        # no [T, K, E] one-hot tensor is built.
        tokens_per_expert_E = torch.zeros(E, dtype=router_dtype, device=x_TH.device).scatter_add_(
            0, expert_indices_TK.reshape(-1), valid_f_T[:, None].expand(T, K).reshape(-1)
        )

        # Load-balancing loss: E * sum_e(mean_prob_e * frac_e), frac over all K choices
        # (frac_e = assignments_e / (T * K)); equals 1 for a perfectly balanced router for any K,
        # and reduces to Switch/GShard's top-1 loss for K = 1.
        mean_prob_E = (probs_TE * valid_f_T[:, None]).sum(0) / denom
        frac_E = tokens_per_expert_E / (denom * K)
        aux_loss = E * torch.sum(mean_prob_E * frac_E)
        z_loss = (torch.logsumexp(logits_TE, dim=-1).square() * valid_f_T).sum() / denom
        with torch.no_grad():
            entropy_sum = (-(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1) * valid_f_T).sum()

        capacity_factor = self.active_capacity_factor()
        if capacity_factor is None:
            capacity = None
            kept_TK = valid_T[:, None].expand(T, K).clone()
        else:
            capacity = compute_capacity(int(num_tokens.item()), E, K, capacity_factor, self.min_capacity)
            priority_T = None
            if self.random_token_selection and self.training:
                priority_T = torch.argsort(torch.rand(T, device=x_TH.device))
            positions_TK = capacity_positions(expert_indices_TK, valid_T, E, priority_T)
            kept_TK = positions_TK < capacity

        weights_TK = top_probs_TK * kept_TK
        if K > 1:
            # Renormalise over the kept choices (DeepSpeed/GShard top-2); top-1 keeps the raw
            # probability so the router still receives a gradient through the combine.
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(router_dtype).eps)
        return RoutingResult(
            expert_indices=expert_indices_TK,
            weights=weights_TK,
            kept=kept_TK,
            tokens_per_expert=tokens_per_expert_E,
            aux_loss=aux_loss,
            z_loss=z_loss,
            probs=probs_TE,
            entropy_sum=entropy_sum,
            num_tokens=num_tokens,
            capacity=capacity,
        )
