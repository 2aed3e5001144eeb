"""Stacked expert FFN weights and the grouped matmul that runs them.

Legend: N dispatched rows (expert-contiguous), H hidden, F ffn, E local experts.

Weights are stacked per expert (``w1_EHF``, ``w3_EHF``, ``w2_EFH``), not a ModuleList of
Linear layers, so a grouped GEMM runs every expert in one call and a checkpoint can key each
expert's slice by its global index. Under expert parallelism the weights are DTensors of global
shape ``[E, ...]`` sharded on the expert-parallel mesh dimension; the methods here compute with
this rank's experts (``to_local()``). Every computation that reads the weights is a method of
the module (``forward``, ``fused_forward``) so that FSDP2 gathers them first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.moe.backend import local_tensor, uses_triton, validate_backend
from lightning_moe.moe.router import RoutingResult

ACTIVATIONS = ("swiglu", "gelu", "relu")
WEIGHT_NAMES = ("w1", "w2", "w3")  # the stacked weights of GroupedExperts (w3: SwiGLU only)


def _grouped_mm_supported(x_NH: Tensor, w_EHF: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (forward and backward)."""
    if not hasattr(torch, "_grouped_mm") or not x_NH.is_cuda:
        return False
    if x_NH.dtype != torch.bfloat16 or w_EHF.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x_NH.device)[0] < 9:
        return False
    # Row strides must be multiples of 16 bytes (8 bf16 elements).
    return x_NH.shape[-1] % 8 == 0 and w_EHF.shape[-1] % 8 == 0


def grouped_mm(x_NH: Tensor, w_EHF: Tensor, counts_E: Tensor) -> Tensor:
    """Row-grouped matmul: rows ``[start_e, end_e)`` of ``x_NH`` times ``w_EHF[e]``.

    Uses ``torch._grouped_mm`` where it is available and supported (CUDA, bf16, Hopper or newer),
    and a per-expert loop of ``torch.mm`` elsewhere (the reference path; every dtype, CPU too).

    Args:
        x_NH: ``[N, H]`` rows in expert-contiguous order.
        w_EHF: ``[E, H, F]`` stacked weights.
        counts_E: ``[E]`` rows per expert (sums to N).

    Returns:
        ``[N, F]``.
    """
    if _grouped_mm_supported(x_NH, w_EHF):
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return torch._grouped_mm(x_NH, w_EHF, offs=offs_E)
    counts = counts_E.tolist()
    out_NF = x_NH.new_empty(x_NH.shape[0], w_EHF.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            out_NF[start : start + n] = x_NH[start : start + n] @ w_EHF[e]
        start += n
    return out_NF


def _dense_ffn_all(x_NH: Tensor, w1_EHF: Tensor, w3_EHF: Tensor | None, w2_EFH: Tensor, activation: str) -> Tensor:
    """Every expert on every row, summed over experts (used for zero rows only: the result is ``[0, H]``)."""
    h_NEF = torch.einsum("nh,ehf->nef", x_NH, w1_EHF)
    if w3_EHF is not None:
        h_NEF = F.silu(h_NEF) * torch.einsum("nh,ehf->nef", x_NH, w3_EHF)
    else:
        h_NEF = F.gelu(h_NEF) if activation == "gelu" else F.relu(h_NEF)
    return torch.einsum("nef,efh->nh", h_NEF, w2_EFH)


class GroupedExperts(nn.Module):
    """``E`` feed-forward experts with stacked weights.

    Args:
        num_experts: experts held by this module (the local experts under expert parallelism).
        hidden_size: H.
        ffn_hidden_size: F.
        activation: ``"swiglu"`` (``w2(silu(x w1) * x w3)``), ``"gelu"`` or ``"relu"`` (``w2(act(x w1))``).
        backend: ``"torch"`` (grouped ``torch`` matmuls), ``"triton"`` (the fused grouped GEMMs
            where they run) or ``"auto"`` (Triton on CUDA).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "swiglu",
        backend: str = "torch",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; choose one of {ACTIVATIONS}")
        validate_backend(backend)
        self.backend = backend
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        else:
            self.register_parameter("w3", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in scaled normal init, per expert (same scale as a Linear layer of that shape)."""
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.ffn_hidden_size))
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=1.0 / math.sqrt(self.hidden_size))

    def local_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(w1, w3, w2)`` of this rank's experts (``w3`` is None without SwiGLU)."""
        w3 = None if self.w3 is None else local_tensor(self.w3)
        return local_tensor(self.w1), w3, local_tensor(self.w2)

    def uses_triton(self, x: Tensor) -> bool:
        """Whether the fused kernels run on ``x`` (backend, device and dtype)."""
        if not uses_triton(self.backend, x):
            return False
        from lightning_moe.kernels.availability import unavailable_reason

        return unavailable_reason(x.device, x.dtype) is None

    def forward(self, x_NH: Tensor, counts_E: Tensor) -> Tensor:
        """Run each (local) expert on its contiguous block of rows.

        Args:
            x_NH: ``[N, H]`` rows sorted by local expert.
            counts_E: ``[E]`` rows per local expert.

        Returns:
            ``[N, H]`` expert outputs, row-aligned with ``x_NH``.
        """
        w1, w3, w2 = self.local_weights()
        if x_NH.shape[0] == 0:
            # No rows for any local expert: a zero-row computation that still reaches every weight,
            # so that each rank's autograd graph (and FSDP2's hooks on it) has the same shape.
            w3_ = None if w3 is None else w3.to(x_NH.dtype)
            return _dense_ffn_all(x_NH, w1.to(x_NH.dtype), w3_, w2.to(x_NH.dtype), self.activation)
        if self.uses_triton(x_NH):
            from lightning_moe.kernels.moe_ffn import grouped_ffn

            return grouped_ffn(x_NH, counts_E, w1, w3, w2, self.activation)
        dtype = x_NH.dtype
        w1, w2 = w1.to(dtype), w2.to(dtype)
        h_NF = grouped_mm(x_NH, w1, counts_E)
        if w3 is not None:
            h_NF = F.silu(h_NF) * grouped_mm(x_NH, w3.to(dtype), counts_E)
        elif self.activation == "gelu":
            h_NF = F.gelu(h_NF)
        else:
            h_NF = F.relu(h_NF)
        return grouped_mm(h_NF, w2, counts_E)

    def fused_forward(self, x_TH: Tensor, routing: RoutingResult) -> tuple[Tensor, Tensor]:
        """Every expert local: gather, expert FFN, scatter and combine in the fused kernels.

        Only where :meth:`uses_triton` is True for ``x_TH`` and all experts are on this rank.

        Args:
            x_TH: ``[T, H]`` tokens in the compute dtype.
            routing: the router's decision for them.

        Returns:
            ``(y_TH, kept_per_expert_E)``: the weighted mixture and the kept pairs per expert.
        """
        from lightning_moe.kernels.hooks import expert_sorted_pairs
        from lightning_moe.kernels.moe_ffn import moe_experts
        from lightning_moe.kernels.router import TritonRoutingResult

        if isinstance(routing, TritonRoutingResult) and routing.row_pair is not None:
            row_pair_P, kept_E = routing.row_pair, routing.kept_per_expert
        else:
            row_pair_P, kept_E = expert_sorted_pairs(routing.expert_indices, routing.kept, self.num_experts)
        w1, w3, w2 = self.local_weights()
        y_TH = moe_experts(x_TH, routing.weights, routing.kept, row_pair_P, kept_E, w1, w3, w2, self.activation)
        return y_TH, kept_E

    def expert_forward(self, e: int, x_TH: Tensor) -> Tensor:
        """Local expert ``e`` on arbitrary rows (a readable reference for tests, and shared experts)."""
        w1, w3, w2 = self.local_weights()
        h = x_TH @ w1[e]
        if w3 is not None:
            h = F.silu(h) * (x_TH @ w3[e])
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return h @ w2[e]
