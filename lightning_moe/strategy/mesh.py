"""The device mesh of expert parallelism: layout, validation, and the one placement table.

Legend: W world size, T tensor-parallel size, N = W / T data-parallel ranks, P expert-parallel
size, D = N / P expert-data-parallel size, E experts of a MoE layer, L = E / P experts per rank.

Every parallel dimension lives on one ``DeviceMesh`` built by :meth:`ParallelDims.build_mesh`
with ``init_device_mesh``, dims named ``("edp", "ep", "tp")`` from outer to inner: tensor-parallel
ranks are consecutive (one node's NVLink), then expert-parallel ranks, then the expert-data-parallel
replicas (DeepSpeed's "E+D" layout). The data-parallel dim ``"dp"`` (N ranks) is ``("edp", "ep")``
flattened: the expert-parallel ranks are carved out of the data-parallel ranks. With W = 8, P = 4::

                    ep ->
    edp        rank 0  rank 1  rank 2  rank 3      EP group {0,1,2,3}  (tokens move over it)
     |         rank 4  rank 5  rank 6  rank 7      EP group {4,5,6,7}
     v         EDP {0,4} {1,5}   {2,6}   {3,7}     (an expert shard's data-parallel group)
               dp = all eight ranks                 (non-expert parameters)

``data_parallel="ddp"`` adds a ``"shard"`` dim of size 1 after ``"ep"``: FSDP2 over
``("dp", "shard")`` is hybrid sharding with shards of one rank, that is replication (DDP).

Placement of every parameter (docs/expert_parallel.md repeats this table; :data:`PLACEMENTS` is it
in code, and :func:`lightning_moe.strategy.parallelize.parallelize` applies it):

=============================  ==========================  ==========================  ==========================
parameters                     ``data_parallel="fsdp"``    ``data_parallel="ddp"``     gradient
=============================  ==========================  ==========================  ==========================
non-expert: embeddings,        FSDP2-sharded on ``dp``     replicated on ``dp``        mean over the N data-
attention, norms, dense FFNs,  (dim 0; see                 (FSDP2 on ``(dp, shard)``,  parallel ranks
shared experts, heads          :func:`fsdp_shard_dim`)     shard size 1)
routers (their own FSDP unit,  as above                    as above                    as above
gathered in float32)
expert weights                 DTensor ``[E, ...]``,       ``Shard(0)`` on ``ep``,     sum over the EDP group,
``experts.w1/w2/w3``           ``Shard(0)`` on ``ep``,     replicated on ``edp``       divided by N
                               FSDP2-sharded on ``edp``
=============================  ==========================  ==========================  ==========================

With these rules a run with any mesh computes the update of one process on the same global
batch (dropless routing; shared/DESIGN.md "Parallel layout").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DATA_PARALLEL_MODES: tuple[str, ...] = ("fsdp", "ddp")

PLACEMENTS: dict[str, dict[str, str]] = {
    "non-expert": {"fsdp": "Shard(0) on dp", "ddp": "Replicate on dp", "gradient": "mean over dp"},
    "router": {"fsdp": "Shard(0) on dp, float32", "ddp": "Replicate on dp, float32", "gradient": "mean over dp"},
    "expert": {
        "fsdp": "Shard(0) on ep, then Shard(0) on edp",
        "ddp": "Shard(0) on ep, Replicate on edp",
        "gradient": "sum over edp / N",
    },
}


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallel dimension; validates itself on construction.

    Args:
        world_size: W, processes in the job.
        expert_parallel_size: P, data-parallel ranks that split the experts of every MoE layer.
        tensor_parallel_size: T, ranks that split attention and dense FFNs (1: off).
        data_parallel: ``"fsdp"`` (ZeRO-3: non-expert state sharded over the N data-parallel
            ranks, expert state over the D expert-data-parallel ranks) or ``"ddp"`` (replicas).

    Raises:
        ValueError: naming the degree that does not fit and what to choose instead.
    """

    world_size: int
    expert_parallel_size: int = 1
    tensor_parallel_size: int = 1
    data_parallel: str = "fsdp"

    def __post_init__(self) -> None:
        W, P, T = self.world_size, self.expert_parallel_size, self.tensor_parallel_size
        for name, value in (("world_size", W), ("expert_parallel_size", P), ("tensor_parallel_size", T)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (1 turns that dimension off)")
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise ValueError(
                f"data_parallel={self.data_parallel!r} is not supported; choose one of {DATA_PARALLEL_MODES}"
            )
        if W % T != 0:
            raise ValueError(
                f"world size {W} is not divisible by tensor_parallel_size={T}; choose a tensor_parallel_size that "
                f"divides {W} (one of {_divisors(W)}) or run on a multiple of {T} devices"
            )
        N = W // T
        if N % P != 0:
            where = (
                f"world size {W}"
                if T == 1
                else f"the {N} data-parallel ranks (world size {W} / tensor_parallel_size={T})"
            )
            raise ValueError(
                f"{where} is not divisible by expert_parallel_size={P}; choose an expert_parallel_size that "
                f"divides {N} (one of {_divisors(N)}) or run on a multiple of {P * T} devices"
            )

    @property
    def data_parallel_size(self) -> int:
        """N = W / T, ranks that split the batch."""
        return self.world_size // self.tensor_parallel_size

    @property
    def expert_data_parallel_size(self) -> int:
        """D = N / P, data-parallel replicas (or FSDP shards) of each expert shard."""
        return self.data_parallel_size // self.expert_parallel_size

    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        """Names of the mesh dims, outer to inner."""
        if self.data_parallel == "ddp":
            return ("edp", "ep", "shard", "tp")
        return ("edp", "ep", "tp")

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Sizes of the mesh dims in :attr:`mesh_dim_names` order."""
        D, P, T = self.expert_data_parallel_size, self.expert_parallel_size, self.tensor_parallel_size
        return (D, P, 1, T) if self.data_parallel == "ddp" else (D, P, T)

    def coordinates(self, rank: int) -> dict[str, int]:
        """``{dim name: index}`` of a global rank on the mesh."""
        out = {}
        for name, size in zip(reversed(self.mesh_dim_names), reversed(self.mesh_shape), strict=True):
            rank, out[name] = divmod(rank, size)
        return {name: out[name] for name in self.mesh_dim_names}

    def expert_parallel_groups(self) -> list[list[int]]:
        """The EP groups as global ranks (consecutive apart from the tensor-parallel stride)."""
        P, T = self.expert_parallel_size, self.tensor_parallel_size
        return [
            [(d * P + p) * T + t for p in range(P)] for d in range(self.expert_data_parallel_size) for t in range(T)
        ]

    def expert_data_parallel_groups(self) -> list[list[int]]:
        """The EDP groups as global ranks (stride ``P * T``)."""
        P, T, D = self.expert_parallel_size, self.tensor_parallel_size, self.expert_data_parallel_size
        return [[(d * P + p) * T + t for d in range(D)] for p in range(P) for t in range(T)]

    def validate_num_experts(self, layers: Sequence[tuple[str, int]]) -> None:
        """Check that ``P`` divides every MoE layer's expert count.

        Args:
            layers: ``(layer name, num_experts)`` of every MoE layer.

        Raises:
            ValueError: naming the first layer whose ``num_experts`` is not divisible by ``P``.
        """
        P = self.expert_parallel_size
        for name, num_experts in layers:
            if num_experts % P != 0:
                raise ValueError(
                    f"MoE layer {name!r} has num_experts={num_experts}, which is not divisible by "
                    f"expert_parallel_size={P}; choose an expert_parallel_size that divides {num_experts} "
                    f"(and the {self.data_parallel_size} data-parallel ranks) or change num_experts"
                )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world ``DeviceMesh`` (a collective: every rank must call it), with ``"dp"`` flattened.

        Args:
            device_type: ``"cuda"`` or ``"cpu"``.

        Returns:
            The mesh; ``mesh["ep"]``, ``mesh["edp"]``, ``mesh["tp"]`` and ``mesh["dp"]`` slice it.

        Raises:
            RuntimeError: if the initialised process group's world size is not :attr:`world_size`.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"the process group has world size {dist.get_world_size()} but the mesh was planned for "
                f"world_size={self.world_size}; build ParallelDims from torch.distributed.get_world_size()"
            )
        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_dim_names)
        mesh["edp", "ep"]._flatten("dp")
        if self.tensor_parallel_size > 1:
            mesh["edp", "tp"]._flatten("edp_tp")  # the ranks an expert shard's gradients are reduced over
        return mesh

    def __str__(self) -> str:
        return (
            f"world {self.world_size} = data-parallel {self.data_parallel_size} ({self.data_parallel}: expert-parallel "
            f"{self.expert_parallel_size} x expert-data-parallel {self.expert_data_parallel_size}) x tensor-parallel "
            f"{self.tensor_parallel_size}"
        )


def fsdp_shard_dim(shape: Sequence[int], shards: int) -> int:
    """The dim FSDP2 splits a parameter on: 0, unless it has fewer rows than ``shards``.

    Then the largest other dim that divides evenly by ``shards`` (FSDP2 pads dim 0 only: any other
    dim must split evenly), which avoids storing mostly padding; dim 0 if none does.

    Args:
        shape: the (local) shape of the parameter.
        shards: ranks it is split over.
    """
    if not shape or shape[0] >= shards:
        return 0
    even = [d for d in range(1, len(shape)) if shape[d] % shards == 0]
    return max(even, key=lambda d: shape[d]) if even else 0


def default_expert_parallel_size(world_size: int, ranks_per_node: int, num_experts: Sequence[int]) -> int:
    """The expert-parallel size chosen when the user gives none.

    The largest ``P`` that divides the world size, every layer's expert count and the ranks of one
    node, so that each all-to-all stays on the node's fast links and each rank holds as few
    experts as possible. Without MoE layers it is 1 (plain data parallelism).

    Args:
        world_size: W (or N, the data-parallel ranks, with tensor parallelism).
        ranks_per_node: processes on each node.
        num_experts: expert count of every MoE layer.

    Returns:
        ``P >= 1``.
    """
    if not num_experts:
        return 1
    bound = math.gcd(world_size, reduce(math.gcd, num_experts))
    bound = math.gcd(bound, max(ranks_per_node, 1))
    return max(bound, 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


__all__ = ["DATA_PARALLEL_MODES", "PLACEMENTS", "ParallelDims", "default_expert_parallel_size", "fsdp_shard_dim"]
