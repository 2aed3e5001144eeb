"""Top-k router with capacity, Random Token Selection, jitter, aux loss and z-loss.

Legend: T tokens, H hidden, E experts, G expert groups, K top-k, N = T * K (token, choice) pairs.

This is the plain PyTorch reference of routing (the oracle the Triton router is tested
against). Semantics in capacity mode with RTS and jitter off are GShard's and DeepSpeed's:
``capacity = max(min_capacity, ceil(T * K / E * capacity_factor))``; first choices take slots
before second choices, earlier tokens before later ones. With Random Token Selection the
choice levels keep their priority (all first choices before any second choice) but, inside
one level, the tokens an over-full expert keeps are a uniformly random subset.

Options the published MoE families need (defaults keep the behaviour above):

- ``score_function``: ``"softmax"`` (Mixtral, Qwen, OLMoE) or ``"sigmoid"`` (DeepSeek-V3) scores;
- ``normalize_top_k``: renormalise the kept weights to sum to 1 (Mixtral, Qwen3-MoE, DeepSeek-V3)
  or keep the raw scores (OLMoE, Qwen2-MoE); ``None`` is the GShard rule: renormalise for
  ``K >= 2``, keep the raw probability for ``K = 1``;
- ``routed_scaling_factor``: a constant multiplying the routed weights (DeepSeek-V3: 2.5);
- ``expert_groups`` / ``top_groups``: group-limited top-k (DeepSeek-V3): experts form ``G`` equal
  groups, a group scores the sum of its two best experts, and each token picks its ``K`` experts
  among the ``top_groups`` best groups only;
- ``expert_bias``: a per-expert correction bias added to the scores for *selection only* (the
  combine weights use the unbiased scores); with ``bias_update_rate > 0`` it is trained by
  aux-loss-free balancing (Wang et al. 2024, DeepSeek-V3): the router counts the tokens each
  expert was chosen for, and after each optimizer step :meth:`Router.update_expert_bias` (called
  by :class:`~lightning_moe.callbacks.ExpertBiasUpdate` or by any training loop through
  :func:`~lightning_moe.moe.update_expert_biases`) moves every bias by ``rate * sign(mean load -
  load)``.

The fused Triton router implements the default options only; :attr:`Router.fused_supported`
says whether a router can use it. ``Router(backend="triton")`` (or ``"auto"`` on CUDA) runs the
fused kernels from its own ``forward`` and this reference otherwise (the one place that decides
it is :func:`lightning_moe.kernels.triton_route`); :meth:`Router.route_reference` is always the
reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_moe.moe.backend import uses_triton, validate_backend


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


SCORE_FUNCTIONS = ("softmax", "sigmoid")


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
    """Bias-free linear gate, softmax or sigmoid scores, (group-limited) top-k and capacity assignment.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: experts per token, in ``[1, E]``.
        capacity_factor: slots per expert relative to a perfectly balanced load; ``None`` is dropless.
        eval_capacity_factor: capacity factor outside training; ``None`` (the default) is dropless.
        min_capacity: lower bound on slots per expert in capacity mode.
        random_token_selection: keep a uniformly random subset of an over-full expert's tokens.
        router_jitter: multiplicative input jitter epsilon (training only); 0 turns it off.
        score_function: ``"softmax"`` or ``"sigmoid"``.
        normalize_top_k: renormalise the kept weights (True), keep raw scores (False), or ``None``
            for renormalising when ``top_k >= 2`` only.
        routed_scaling_factor: constant factor on the combine weights.
        expert_groups: G, equal groups of experts for group-limited top-k; 1 turns it off.
        top_groups: groups a token may pick its experts from; ``None`` is all ``G``.
        expert_bias: add a per-expert correction bias (buffer ``expert_bias``, float32) to the
            scores when selecting experts.
        bias_update_rate: step of the aux-loss-free bias update (DeepSeek-V3: 0.001); 0 keeps
            the bias fixed. Needs ``expert_bias=True``.
        backend: ``"torch"`` (this reference), ``"triton"`` (the fused kernels where they run)
            or ``"auto"`` (Triton on CUDA).

    Raises:
        ValueError: on an invalid option, naming it and the fix.
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
        score_function: str = "softmax",
        normalize_top_k: bool | None = None,
        routed_scaling_factor: float = 1.0,
        expert_groups: int = 1,
        top_groups: int | None = None,
        expert_bias: bool = False,
        bias_update_rate: float = 0.0,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        validate_backend(backend)
        validate_router_options(
            num_experts, top_k, score_function, routed_scaling_factor, expert_groups, top_groups, expert_bias,
            bias_update_rate,
        )  # fmt: skip
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.random_token_selection = random_token_selection
        self.router_jitter = router_jitter
        self.score_function = score_function
        self.normalize_top_k = normalize_top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.expert_groups = expert_groups
        self.top_groups = expert_groups if top_groups is None else top_groups
        self.bias_update_rate = bias_update_rate
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.expert_bias: Tensor | None
        self.expert_load: Tensor | None
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            # Tokens each expert was chosen for since the last bias update (training forwards only).
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = None
            self.expert_load = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal init so that early routing is close to uniform; a zero correction bias."""
        nn.init.normal_(self.weight, std=self.hidden_size**-0.5 * 0.1)
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)
        if self.expert_load is not None:
            nn.init.zeros_(self.expert_load)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # The correction bias and the load counts stay float32 under model.to(bfloat16): bias
        # steps of 1e-3 and token counts are below bfloat16's resolution.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "expert_load"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32 and buf.is_floating_point():
                setattr(self, name, buf.float())
        return self

    @property
    def renormalizes(self) -> bool:
        """Whether the kept weights of a token are renormalised to sum to 1."""
        return self.top_k > 1 if self.normalize_top_k is None else self.normalize_top_k

    @property
    def fused_supported(self) -> bool:
        """Whether the fused Triton router implements this router's options (the defaults only)."""
        return (
            self.score_function == "softmax"
            and self.renormalizes == (self.top_k > 1)
            and self.routed_scaling_factor == 1.0
            and self.expert_groups == 1
            and self.expert_bias is None
        )

    def active_capacity_factor(self) -> float | None:
        """The capacity factor in force for the current mode: ``capacity_factor`` in training, ``eval_capacity_factor`` in eval.

        ``None`` is dropless, so by default evaluation and decoding drop no token and a sentence's
        output does not depend on the other sentences of its batch.
        """
        return self.capacity_factor if self.training else self.eval_capacity_factor

    @torch.no_grad()
    def update_expert_bias(self, load_E: Tensor | None = None) -> None:
        """One aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``, then reset the counts.

        Call it after the optimizer step. Under data or expert parallelism pass the load summed
        over all ranks (:func:`~lightning_moe.moe.update_expert_biases` does that), so that every
        rank applies the same update.

        Args:
            load_E: ``[E]`` tokens per expert since the last update; ``None`` uses this rank's counts.
        """
        if self.expert_bias is None or self.expert_load is None or self.bias_update_rate == 0:
            return
        load_E = self.expert_load if load_E is None else load_E.to(self.expert_load)
        if float(load_E.sum()) > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_load.zero_()

    def _select(self, scores_TE: Tensor) -> Tensor:
        """``[T, K]`` chosen experts: top-k of the (biased, group-limited) selection scores."""
        select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias.to(scores_TE.dtype)
        if self.expert_groups > 1 and self.top_groups < self.expert_groups:
            T, E, G = select_TE.shape[0], self.num_experts, self.expert_groups
            grouped_TGe = select_TE.view(T, G, E // G)
            group_score_TG = grouped_TGe.topk(min(2, E // G), dim=-1).values.sum(-1)
            top_groups_TG = torch.topk(group_score_TG, self.top_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
            select_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(E // G, dim=1), float("-inf"))
        return torch.topk(select_TE, self.top_k, dim=-1).indices

    def forward(self, x_TH: Tensor, padding_mask_T: Tensor | None = None) -> RoutingResult:
        """Route a flat batch of tokens with this router's backend.

        Args:
            x_TH: ``[T, H]`` tokens.
            padding_mask_T: optional ``[T]`` bool, True marks padding tokens (not routed, not counted).

        Returns:
            The :class:`RoutingResult` (the fused router's carries the expert-sorted permutation too).
        """
        if uses_triton(self.backend, x_TH):
            from lightning_moe.kernels import triton_route

            return triton_route(self, x_TH, padding_mask_T)
        return self.route_reference(x_TH, padding_mask_T)

    def route_reference(self, x_TH: Tensor, padding_mask_T: Tensor | None = None) -> RoutingResult:
        """Route with the plain PyTorch reference, whatever the backend (arguments as :meth:`forward`)."""
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
        if self.score_function == "softmax":
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
            # The load-balancing loss and the entropy see the scores normalised per token.
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        expert_indices_TK = self._select(scores_TE)
        top_probs_TK = scores_TE.gather(1, expert_indices_TK)

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
        if self.training and self.expert_load is not None and self.bias_update_rate > 0:
            self.expert_load += tokens_per_expert_E.detach().float()
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
        if self.renormalizes:
            # Renormalise over the kept choices (DeepSpeed/GShard top-2); by default top-1 keeps the
            # raw probability so the router still receives a gradient through the combine.
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(router_dtype).eps)
        if self.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * self.routed_scaling_factor
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


def validate_router_options(
    num_experts: int,
    top_k: int,
    score_function: str,
    routed_scaling_factor: float,
    expert_groups: int,
    top_groups: int | None,
    expert_bias: bool,
    bias_update_rate: float,
) -> None:
    """Check the routing options of :class:`Router` (raises ``ValueError`` naming the value and the fix)."""
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function={score_function!r} is not supported; choose one of {SCORE_FUNCTIONS}")
    if routed_scaling_factor <= 0:
        raise ValueError(f"routed_scaling_factor={routed_scaling_factor} must be positive (1.0 leaves weights as is)")
    if expert_groups < 1 or num_experts % expert_groups != 0:
        raise ValueError(
            f"expert_groups={expert_groups} must be a positive divisor of num_experts={num_experts}; "
            "use 1 to turn group-limited routing off"
        )
    if top_groups is not None:
        if not 1 <= top_groups <= expert_groups:
            raise ValueError(
                f"top_groups={top_groups} must be between 1 and expert_groups={expert_groups} (None: all groups)"
            )
        if top_groups * (num_experts // expert_groups) < top_k:
            raise ValueError(
                f"top_groups={top_groups} groups of {num_experts // expert_groups} experts hold fewer than "
                f"top_k={top_k} experts; raise top_groups to at least "
                f"{math.ceil(top_k / (num_experts // expert_groups))}"
            )
    if bias_update_rate < 0:
        raise ValueError(f"bias_update_rate={bias_update_rate} must be >= 0 (0 keeps the bias fixed; 0.001 is typical)")
    if bias_update_rate > 0 and not expert_bias:
        raise ValueError(
            f"bias_update_rate={bias_update_rate} needs a correction bias; set expert_bias=True "
            "(aux-loss-free balancing trains that bias)"
        )
