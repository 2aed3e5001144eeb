"""Dispatch and combine: tokens to expert-contiguous rows and back, within a rank or across ranks.

Legend: T tokens, H hidden, K top-k, E global experts, L local experts per rank, P ranks in the
expert-parallel group, N kept (token, choice) pairs on this rank, R rows received by this rank.

Single process: permute kept pairs into expert order, run experts, write each output row back to
its (token, choice) slot, weighted sum over the K choices. With expert parallelism the permuted
rows are grouped by destination rank (experts of rank p are ``[p * L, (p + 1) * L)``), per-expert
counts go through one all-to-all, rows through a second one with uneven splits, and the received
rows are regrouped from (source rank, local expert) to (local expert, source rank) order so that
each local expert's rows are contiguous. Combine runs the same steps backwards.

With tensor parallelism (``tp_mesh``) the tokens, and the routing, are the same on every rank of
the tensor-parallel group; DeepSpeed's rule keeps them from reaching the experts once per rank:
each rank dispatches its ``1/TP`` chunk of the expert-sorted pairs (DTensor ``Replicate ->
Shard(0)``: the backward gathers the chunks' gradients), and combine gathers the chunks' outputs
(``Shard(0) -> Replicate``: the backward keeps each rank's chunk) before the weighted sum, which
every rank then computes alike.

The combine never uses ``index_add``/atomics: every (token, choice) slot is written exactly once,
so the result is deterministic on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe.moe.router import RoutingResult


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Differentiable uneven all-to-all of rows of ``x`` over ``group``."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class DispatchState:
    """What combine needs to undo a dispatch.

    Attributes:
        pair_index_N: flat (token * K + choice) slot of each kept pair, in global-expert order.
        weights_N: combine weight of each kept pair (differentiable).
        num_tokens: T.
        top_k: K.
        num_pairs: N, kept pairs of every tensor-parallel rank together (TP only).
        send_splits: rows sent to each rank of the expert-parallel group (EP only).
        recv_splits: rows received from each rank (EP only).
        regroup_R: permutation taking received (rank, expert) order to (expert, rank) order (EP only).
    """

    pair_index_N: Tensor
    weights_N: Tensor
    num_tokens: int
    top_k: int
    num_pairs: int = 0
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup_R: Tensor | None = None


@dataclass
class ExpertParallelGroup:
    """The process group a MoE layer exchanges tokens over, and this rank's place in it.

    Attributes:
        group: the expert-parallel process group (None only when ``size == 1``).
        size: P, ranks in the group.
        rank: this rank's index in the group; it holds experts ``[rank * L, (rank + 1) * L)``.
    """

    group: object | None
    size: int
    rank: int


class TokenDispatcher:
    """Moves routed tokens to the experts that own them and their outputs back.

    Args:
        num_experts: E, the global expert count.
        ep: the expert-parallel group; ``None`` for a single process (all experts local).
        tp_mesh: the 1-D tensor-parallel ``DeviceMesh`` whose ranks hold the same tokens; ``None``
            without tensor parallelism.
    """

    def __init__(self, num_experts: int, ep: ExpertParallelGroup | None = None, tp_mesh: Any = None) -> None:
        self.num_experts = num_experts
        self.ep = ep if ep is not None and ep.size > 1 else None
        self.tp_mesh = tp_mesh if tp_mesh is not None and tp_mesh.size() > 1 else None

    def _tp_chunk(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this tensor-parallel rank's chunk of ``n`` rows (``torch.chunk``'s split, as DTensor's)."""
        size, rank = self.tp_mesh.size(), self.tp_mesh.get_local_rank()
        step = -(-n // size)
        lo = min(n, rank * step)
        return lo, min(n, lo + step)

    @property
    def num_local_experts(self) -> int:
        """L, experts held by this rank."""
        return self.num_experts // (self.ep.size if self.ep else 1)

    def dispatch(self, x_TH: Tensor, routing: RoutingResult) -> tuple[Tensor, Tensor, Tensor, DispatchState]:
        """Gather kept pairs into rows grouped by local expert.

        Args:
            x_TH: ``[T, H]`` tokens.
            routing: the router's decision for these tokens.

        Returns:
            ``(rows, counts_L, kept_per_expert_E, state)``: rows ``[R, H]`` contiguous per local
            expert, ``counts_L`` rows per local expert (long), this rank's kept pairs per global
            expert (long, before any exchange), and the state for :meth:`combine`.
        """
        T, K = routing.expert_indices.shape
        E = self.num_experts
        experts_TK = routing.expert_indices
        kept_N = routing.kept.reshape(-1)
        pair_kept = torch.nonzero(kept_N, as_tuple=True)[0]
        experts_kept = experts_TK.reshape(-1)[pair_kept]
        order = torch.argsort(experts_kept, stable=True)
        pair_index_N = pair_kept[order]
        counts_E = torch.bincount(experts_kept, minlength=E)
        rows_NH = x_TH[pair_index_N // K]
        state = DispatchState(
            pair_index_N=pair_index_N,
            weights_N=routing.weights.reshape(-1)[pair_index_N],
            num_tokens=T,
            top_k=K,
            num_pairs=pair_index_N.shape[0],
        )
        if self.tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Replicate, Shard

            lo, hi = self._tp_chunk(state.num_pairs)
            rows_NH = (
                DTensor.from_local(rows_NH, self.tp_mesh, [Replicate()], run_check=False)
                .redistribute(self.tp_mesh, [Shard(0)])
                .to_local()
            )
            counts_E = torch.bincount(experts_kept[order][lo:hi], minlength=E)
        if self.ep is None:
            return rows_NH, counts_E, counts_E, state

        P, L = self.ep.size, self.num_local_experts
        recv_counts_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_PL, counts_E, group=self.ep.group)
        recv_counts_PL = recv_counts_PL.view(P, L)
        # One host sync for both split lists.
        splits = torch.stack([counts_E.view(P, L).sum(1), recv_counts_PL.sum(1)]).tolist()
        state.send_splits, state.recv_splits = splits[0], splits[1]
        rows_RH = all_to_all(rows_NH, state.recv_splits, state.send_splits, self.ep.group)
        # Received rows come as (source rank, local expert) segments; sort them to (expert, rank).
        device = x_TH.device
        segment_key = (torch.arange(L, device=device)[None, :] * P + torch.arange(P, device=device)[:, None]).reshape(
            -1
        )
        row_key_R = torch.repeat_interleave(segment_key, recv_counts_PL.reshape(-1))
        state.regroup_R = torch.argsort(row_key_R, stable=True)
        return rows_RH[state.regroup_R], recv_counts_PL.sum(0), counts_E, state

    def combine(self, rows_RH: Tensor, state: DispatchState) -> Tensor:
        """Bring expert outputs back to token order and mix the K choices.

        Args:
            rows_RH: expert outputs, row-aligned with what :meth:`dispatch` returned.
            state: the dispatch state.

        Returns:
            ``[T, H]``; tokens with no kept choice (dropped or padding) are 0.
        """
        if self.ep is not None:
            assert state.regroup_R is not None and state.send_splits is not None and state.recv_splits is not None
            unsorted = torch.empty_like(rows_RH)
            unsorted[state.regroup_R] = rows_RH
            rows_RH = all_to_all(unsorted, state.send_splits, state.recv_splits, self.ep.group)
        if self.tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            H = rows_RH.shape[-1]
            rows_RH = DTensor.from_local(
                rows_RH, self.tp_mesh, [Shard(0)], run_check=False, shape=(state.num_pairs, H), stride=(H, 1)
            ).full_tensor()
        T, K, H = state.num_tokens, state.top_k, rows_RH.shape[-1]
        weighted_NH = rows_RH * state.weights_N.to(rows_RH.dtype)[:, None]
        slots_TKH = rows_RH.new_zeros(T * K, H).index_copy(0, state.pair_index_N, weighted_NH)
        return slots_TKH.view(T, K, H).sum(1)
