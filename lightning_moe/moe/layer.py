"""The Mixture-of-Experts layer: route, dispatch, experts, combine.

Legend: T tokens, H hidden, F ffn, E global experts, L local experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_moe.moe.backend import BACKENDS, validate_backend
from lightning_moe.moe.dispatch import ExpertParallelGroup, TokenDispatcher
from lightning_moe.moe.experts import ACTIVATIONS, GroupedExperts
from lightning_moe.moe.router import Router, RoutingResult


@dataclass
class MoEStats:
    """Statistics of one forward of a :class:`MoE` layer, for monitoring (all detached tensors).

    Attributes:
        tokens_per_expert: ``[E]`` float32 (token, choice) assignments per global expert before
            capacity dropping, from this rank's tokens.
        kept_per_expert: ``[E]`` float32, the same after dropping.
        num_tokens: non-padding tokens routed on this rank.
        dropped: (token, choice) pairs dropped by capacity.
        router_entropy_sum: sum over tokens of the router distribution's entropy.
        aux_loss: unweighted load-balancing loss.
        z_loss: unweighted router z-loss.
    """

    tokens_per_expert: Tensor
    kept_per_expert: Tensor
    num_tokens: Tensor
    dropped: Tensor
    router_entropy_sum: Tensor
    aux_loss: Tensor
    z_loss: Tensor


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer (Kim et al. 2021; GShard/DeepSpeed-MoE semantics).

    ``y = moe(x)`` maps ``x [..., H]`` to ``y [..., H]``. Tokens an expert had no room for
    contribute 0 (the surrounding residual connection carries them). After every forward,
    ``moe.aux_loss`` holds the weighted load-balancing + z-loss (add it to the training loss) and
    ``moe.last_stats`` the :class:`MoEStats` for monitoring.

    The forward is the data path of shared/DESIGN.md: ``router`` (a :class:`Router`), then
    ``dispatcher`` (:class:`TokenDispatcher`: permutation and, under expert parallelism, the
    all-to-all), ``experts`` (:class:`GroupedExperts`), and the dispatcher's combine. Each stage
    picks the torch reference or the Triton kernels from ``backend`` inside its own module, so
    FSDP2 and activation checkpointing apply to every stage. With ``recompute_experts = True``
    the expert FFN is recomputed in the backward (its hidden activations are not kept) while the
    routing and the all-to-all are not repeated.

    Args:
        hidden_size: H, model width.
        ffn_hidden_size: F, hidden width of each expert.
        num_experts: E, global number of experts.
        top_k: experts per token, in ``[1, E]``.
        capacity_factor: slots per expert relative to a perfectly balanced load in training;
            ``None`` is dropless (every choice is computed).
        eval_capacity_factor: capacity factor in eval mode (validation, decoding); ``None`` (the
            default) is dropless, so no token is dropped and an output does not depend on its batch
            neighbours. Pass a value (the paper evaluates at 2.0) for capacity-mode evaluation.
        min_capacity: lower bound on slots per expert in capacity mode.
        random_token_selection: Random Token Selection: an over-full expert keeps a uniformly
            random subset of its tokens (training only) instead of the earliest ones.
        router_jitter: multiplicative input jitter epsilon for the router, training only.
        aux_loss_weight: weight of the load-balancing loss in ``aux_loss``.
        z_loss_weight: weight of the router z-loss in ``aux_loss``.
        activation: expert FFN, ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        backend: ``"torch"`` (reference, every device and dtype), ``"triton"`` (fused CUDA
            kernels) or ``"auto"`` (Triton on CUDA, torch elsewhere).
        num_shared_experts: DeepSeek-style shared experts every token passes through (0 = off);
            they form one dense FFN of width ``num_shared_experts * ffn_hidden_size``.
        shared_expert_ffn_size: width of that shared FFN when it is not
            ``num_shared_experts * ffn_hidden_size`` (Qwen2-MoE); ``None`` uses that product.
        shared_expert_gate: scale the shared FFN's output per token by ``sigmoid(x @ g)``, with
            ``g`` a learned ``[1, H]`` weight (Qwen2-MoE).
        score_function: router scores, ``"softmax"`` or ``"sigmoid"`` (see :class:`Router`).
        normalize_top_k: renormalise the kept weights; ``None``: only when ``top_k >= 2``.
        routed_scaling_factor: constant factor on the routed experts' combine weights.
        expert_groups: expert groups of group-limited top-k (1 = off).
        top_groups: groups each token may choose from (``None`` = all).
        expert_bias: a per-expert correction bias used for expert selection only.
        bias_update_rate: aux-loss-free balancing step of that bias, applied by
            :func:`~lightning_moe.moe.update_expert_biases` after each optimizer step (0 = fixed).

    Raises:
        ValueError: on an invalid configuration, naming the value and the fix.

    Example:
        >>> moe = MoE(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)
        >>> moe(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        random_token_selection: bool = True,
        router_jitter: float = 0.0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        activation: str = "swiglu",
        backend: str = "auto",
        num_shared_experts: int = 0,
        shared_expert_ffn_size: int | None = None,
        shared_expert_gate: bool = False,
        score_function: str = "softmax",
        normalize_top_k: bool | None = None,
        routed_scaling_factor: float = 1.0,
        expert_groups: int = 1,
        top_groups: int | None = None,
        expert_bias: bool = False,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _validate(
            hidden_size, ffn_hidden_size, num_experts, top_k, capacity_factor, eval_capacity_factor,
            min_capacity, router_jitter, aux_loss_weight, z_loss_weight, activation, backend, num_shared_experts,
            shared_expert_ffn_size, shared_expert_gate,
        )  # fmt: skip
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = Router(
            hidden_size, num_experts, top_k, capacity_factor, eval_capacity_factor,
            min_capacity, random_token_selection, router_jitter, score_function, normalize_top_k,
            routed_scaling_factor, expert_groups, top_groups, expert_bias, bias_update_rate, backend,
        )  # fmt: skip
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_hidden_size, activation, backend)
        if shared_expert_ffn_size is None:
            shared_expert_ffn_size = ffn_hidden_size * num_shared_experts
        self.shared_experts = (
            GroupedExperts(1, hidden_size, shared_expert_ffn_size, activation) if num_shared_experts > 0 else None
        )
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate and num_shared_experts > 0 else None
        )
        self.dispatcher = TokenDispatcher(num_experts)
        self.expert_offset = 0
        self.recompute_experts = False
        self.aux_loss: Tensor | None = None
        self.last_stats: MoEStats | None = None

    @property
    def backend(self) -> str:
        """``"auto"``, ``"torch"`` or ``"triton"``: the implementation of the router and the experts."""
        return self.experts.backend

    @backend.setter
    def backend(self, value: str) -> None:
        validate_backend(value)
        self.router.backend = self.experts.backend = value

    @property
    def num_local_experts(self) -> int:
        """Experts held by this rank (all of them without expert parallelism)."""
        return self.dispatcher.num_local_experts

    @property
    def expert_parallel(self) -> ExpertParallelGroup | None:
        """The expert-parallel group tokens are exchanged over (``None``: every expert is local)."""
        return self.dispatcher.ep

    def set_expert_parallel(self, ep: ExpertParallelGroup) -> None:
        """Exchange tokens over ``ep`` from now on; this rank computes experts ``[rank * L, (rank + 1) * L)``.

        The expert weights must already hold those experts: plain ``[L, ...]`` tensors (as
        :meth:`shard_experts` leaves them) or DTensors of global shape ``[E, ...]`` sharded on
        dim 0 over ``ep`` (as :func:`lightning_moe.strategy.parallelize` makes them).

        Args:
            ep: the expert-parallel group and this rank's place in it.

        Raises:
            ValueError: if ``num_experts`` is not divisible by the group size.
        """
        if self.num_experts % ep.size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by expert_parallel_size={ep.size}; "
                f"choose an expert_parallel_size that divides {self.num_experts}"
            )
        self.dispatcher = TokenDispatcher(self.num_experts, ep, self.dispatcher.tp_mesh)
        self.expert_offset = ep.rank * (self.num_experts // ep.size)

    def set_tensor_parallel(self, tp_mesh: Any) -> None:
        """Dispatch only this rank's ``1/TP`` chunk of the routed pairs (the tokens are the same on every TP rank).

        Every rank of ``tp_mesh`` routes the same tokens alike; each sends its chunk of the kept
        (token, choice) pairs to the experts and the outputs are gathered back before the combine,
        so each expert sees every token once (DeepSpeed's rule for MoE under tensor parallelism).
        Statistics (:class:`MoEStats`) then count this rank's share, so that they add up over ranks.

        Args:
            tp_mesh: the 1-D tensor-parallel ``DeviceMesh``.
        """
        self.dispatcher = TokenDispatcher(self.num_experts, self.dispatcher.ep, tp_mesh)

    def shard_experts(self, ep: ExpertParallelGroup) -> None:
        """Keep only this rank's experts and exchange tokens over ``ep.group`` from now on.

        Called by :class:`~lightning_moe.ExpertParallelStrategy` at setup, before the optimizer
        is built. The kept slices are this rank's experts ``[rank * L, (rank + 1) * L)`` of the
        layer as initialised, so a sharded run starts from the same weights as a single process.

        Args:
            ep: the expert-parallel group and this rank's place in it.

        Raises:
            ValueError: if ``num_experts`` is not divisible by the group size, or the layer is
                already sharded.
        """
        if self.num_local_experts != self.num_experts:
            raise ValueError(
                f"this MoE layer is already sharded ({self.num_local_experts} of {self.num_experts} experts local); "
                "call shard_experts once"
            )
        if self.num_experts % ep.size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by expert_parallel_size={ep.size}; "
                f"choose an expert_parallel_size that divides {self.num_experts}"
            )
        L = self.num_experts // ep.size
        start = ep.rank * L
        experts = self.experts
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                param = getattr(experts, name)
                if param is not None:
                    setattr(experts, name, nn.Parameter(param[start : start + L].clone()))
        experts.num_experts = L
        self.set_expert_parallel(ep)

    def unshard_experts(self) -> None:
        """Gather every expert back from the expert-parallel group (the inverse of :meth:`shard_experts`).

        A collective over the group: every rank of it must call this. Afterwards the layer holds
        all ``num_experts`` experts and runs without exchanging tokens. A no-op if the layer is
        not sharded.
        """
        ep = self.dispatcher.ep
        if ep is None:
            return
        experts = self.experts
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                param = getattr(experts, name)
                if param is None:
                    continue
                local = param.detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(ep.size)]
                dist.all_gather(parts, local, group=ep.group)
                setattr(experts, name, nn.Parameter(torch.cat(parts), requires_grad=param.requires_grad))
        experts.num_experts = self.num_experts
        self.expert_offset = 0
        self.dispatcher = TokenDispatcher(self.num_experts)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Apply the layer.

        Args:
            x: ``[..., H]`` input.
            padding_mask: optional bool ``[...]`` (``x.shape[:-1]``); True marks padding tokens,
                which are neither routed nor counted and get output 0.

        Returns:
            ``[..., H]``, the same dtype as ``x``.

        Raises:
            ValueError: if the last dimension of ``x`` is not ``hidden_size`` or the mask's shape
                does not match.
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE got input with last dimension {x.shape[-1]} (shape {tuple(x.shape)}) but hidden_size="
                f"{self.hidden_size}; pass [..., {self.hidden_size}] tensors or build the layer with "
                f"hidden_size={x.shape[-1]}"
            )
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"padding_mask has shape {tuple(padding_mask.shape)} but x has shape {tuple(x.shape)}; "
                f"padding_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}"
            )
        x_TH = x.reshape(-1, self.hidden_size)
        mask_T = None if padding_mask is None else padding_mask.reshape(-1).bool()
        compute_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            compute_dtype = torch.get_autocast_dtype(x.device.type)
        x_compute_TH = x_TH.to(compute_dtype)  # experts run in the autocast dtype; the router stays fp32
        routing = self.router(x_TH, mask_T)
        y_TH, kept_E = self._experts_step(x_compute_TH, routing)
        if self.shared_experts is not None:
            with torch.autocast(device_type=x.device.type, enabled=False):
                shared = self.shared_experts.expert_forward(0, x_compute_TH)
                if self.shared_expert_gate is not None:
                    gate_T1 = torch.sigmoid(x_compute_TH @ self.shared_expert_gate.weight.to(shared.dtype).t())
                    shared = shared * gate_T1
            if mask_T is not None:
                shared = shared * (~mask_T)[:, None].to(shared.dtype)
            y_TH = y_TH + shared

        self.aux_loss = self.aux_loss_weight * routing.aux_loss + self.z_loss_weight * routing.z_loss
        kept_E = kept_E.detach().float()
        # Under tensor parallelism every TP rank routed the same tokens: count its share only.
        share = 1.0 / self.dispatcher.tp_mesh.size() if self.dispatcher.tp_mesh is not None else 1.0
        routed_E = routing.tokens_per_expert.detach().float() * share
        self.last_stats = MoEStats(
            tokens_per_expert=routed_E,
            kept_per_expert=kept_E,
            num_tokens=routing.num_tokens.detach().float() * share,
            dropped=routed_E.sum() - kept_E.sum(),
            router_entropy_sum=routing.entropy_sum.float() * share,
            aux_loss=routing.aux_loss.detach().float(),
            z_loss=routing.z_loss.detach().float(),
        )
        return y_TH.to(x.dtype).view(x.shape)

    def _experts_step(self, x_TH: Tensor, routing: RoutingResult) -> tuple[Tensor, Tensor]:
        """Dispatch, expert FFN and combine: ``(y_TH, kept_per_expert_E)``."""
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            local = self.dispatcher.ep is None and self.dispatcher.tp_mesh is None
            if local and x_TH.shape[0] > 0 and self.experts.uses_triton(x_TH):
                # Every expert local: gather, FFN, scatter and combine fused in the kernels.
                return self._recomputable(self.experts.fused_forward, x_TH, routing)
            rows_RH, counts_L, kept_E, state = self.dispatcher.dispatch(x_TH, routing)
            out_RH = self._recomputable(self.experts, rows_RH, counts_L)
            return self.dispatcher.combine(out_RH, state), kept_E

    def _recomputable(self, fn, *args):  # type: ignore[no-untyped-def]
        if self.recompute_experts and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @torch.no_grad()
    def reference_forward(self, x_TH: Tensor, routing_weights_TK: Tensor, expert_indices_TK: Tensor) -> Tensor:
        """Naive per-token mixture ``sum_k w_k * expert_k(x)`` (all experts local; for tests)."""
        out = torch.zeros_like(x_TH)
        for t in range(x_TH.shape[0]):
            for k in range(expert_indices_TK.shape[1]):
                w = routing_weights_TK[t, k]
                if w != 0:
                    out[t] += w * self.experts.expert_forward(int(expert_indices_TK[t, k]), x_TH[t : t + 1])[0]
        return out


def _validate(
    hidden_size: int,
    ffn_hidden_size: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    eval_capacity_factor: float | None,
    min_capacity: int,
    router_jitter: float,
    aux_loss_weight: float,
    z_loss_weight: float,
    activation: str,
    backend: str,
    num_shared_experts: int,
    shared_expert_ffn_size: int | None,
    shared_expert_gate: bool,
) -> None:
    if hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size} must be a positive integer")
    if ffn_hidden_size < 1:
        raise ValueError(f"ffn_hidden_size={ffn_hidden_size} must be a positive integer")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be at least 1; use num_experts >= 1 (1 is a dense FFN)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} must be between 1 and num_experts={num_experts}; choose top_k <= {num_experts} "
            "or add experts"
        )
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if value is not None and value <= 0:
            raise ValueError(
                f"{name}={value} must be positive; use a value > 0 (1.0-2.0 is typical) or None for dropless"
            )
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")
    if not 0 <= router_jitter < 1:
        raise ValueError(f"router_jitter={router_jitter} must be in [0, 1); 0 turns jitter off, 0.01 is typical")
    if aux_loss_weight < 0 or z_loss_weight < 0:
        raise ValueError(
            f"aux_loss_weight={aux_loss_weight} and z_loss_weight={z_loss_weight} must be >= 0; use 0 to turn a loss off"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {ACTIVATIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0 (0 turns shared experts off)")
    if shared_expert_ffn_size is not None and shared_expert_ffn_size < 1:
        raise ValueError(
            f"shared_expert_ffn_size={shared_expert_ffn_size} must be positive, or None for "
            "num_shared_experts * ffn_hidden_size"
        )
    if shared_expert_gate and num_shared_experts == 0:
        raise ValueError("shared_expert_gate=True needs a shared expert; set num_shared_experts >= 1")


def moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """All MoE layers inside ``module`` with their qualified names, in registration order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


__all__ = ["MoE", "MoEStats", "moe_layers"]
