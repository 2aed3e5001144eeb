"""The ``(expert_data_parallel, expert_parallel)`` device mesh: layout, validation, process groups.

Legend: W world size, P expert-parallel size, D = W / P expert-data-parallel size, E experts of a
MoE layer, L = E / P experts per rank.

Expert-parallel ranks are consecutive (DeepSpeed's "E+D" layout), so that an all-to-all stays
inside a node whenever ``P`` divides the number of devices per node. With W = 8 and P = 4::

                    expert_parallel ->
    expert_data       rank 0  rank 1  rank 2  rank 3      EP group {0,1,2,3}
    _parallel    |    rank 4  rank 5  rank 6  rank 7      EP group {4,5,6,7}
                 v    EDP {0,4} {1,5}   {2,6}   {3,7}

Placement of every parameter (the one table; docs/expert_parallel.md repeats it):

==================================  ===============================  ===============================
parameters                          held by                          gradient
==================================  ===============================  ===============================
non-expert: embeddings, attention,  every rank (replicated)          DDP all-reduce, mean over W
norms, routers, dense FFNs, shared
experts, heads
expert weights ``experts.w1/w2/w3`` EP rank ``p`` holds experts      all-reduce sum over the EDP
of every MoE layer                  ``[p*L, (p+1)*L)``, replicated   group, then divide by W
                                    over its EDP group
==================================  ===============================  ===============================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch.distributed as dist

from lightning_moe.moe.dispatch import ExpertParallelGroup

MESH_DIM_NAMES = ("expert_data_parallel", "expert_parallel")


@dataclass(frozen=True)
class ExpertParallelMesh:
    """The rank layout of expert parallelism; validates itself on construction.

    Args:
        world_size: W, processes in the job.
        expert_parallel_size: P, ranks that split the experts of every MoE layer between them.

    Raises:
        ValueError: if a size is not a positive integer or ``P`` does not divide ``W``.
    """

    world_size: int
    expert_parallel_size: int

    def __post_init__(self) -> None:
        W, P = self.world_size, self.expert_parallel_size
        if not isinstance(W, int) or W < 1:
            raise ValueError(f"world_size={W!r} must be a positive integer")
        if not isinstance(P, int) or P < 1:
            raise ValueError(f"expert_parallel_size={P!r} must be a positive integer (1 turns expert parallelism off)")
        if W % P != 0:
            divisors = [d for d in range(1, W + 1) if W % d == 0]
            raise ValueError(
                f"world size {W} is not divisible by expert_parallel_size={P}; choose an expert_parallel_size that "
                f"divides {W} (one of {divisors}) or run on a multiple of {P} devices"
            )

    @property
    def expert_data_parallel_size(self) -> int:
        """D = W / P, replicas of each expert shard."""
        return self.world_size // self.expert_parallel_size

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, P)``, the mesh shape in :data:`MESH_DIM_NAMES` order."""
        return (self.expert_data_parallel_size, self.expert_parallel_size)

    def coordinates(self, rank: int) -> tuple[int, int]:
        """``(edp_rank, ep_rank)`` of a global rank."""
        return divmod(rank, self.expert_parallel_size)

    def expert_parallel_groups(self) -> list[list[int]]:
        """The EP groups, consecutive ranks: ``[[0..P-1], [P..2P-1], ...]``."""
        P = self.expert_parallel_size
        return [list(range(d * P, (d + 1) * P)) for d in range(self.expert_data_parallel_size)]

    def expert_data_parallel_groups(self) -> list[list[int]]:
        """The EDP groups, strided ranks: ``[[0, P, 2P, ...], [1, P+1, ...], ...]``."""
        P = self.expert_parallel_size
        return [list(range(p, self.world_size, P)) for p in range(P)]

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
                    f"(and the world size {self.world_size}) or change num_experts"
                )


def default_expert_parallel_size(world_size: int, ranks_per_node: int, num_experts: Sequence[int]) -> int:
    """The expert-parallel size chosen when the user gives none.

    The largest ``P`` that divides the world size, every layer's expert count and the ranks of one
    node, so that each all-to-all stays on the node's fast links and each rank holds as few
    experts as possible. Without MoE layers it is 1 (plain data parallelism).

    Args:
        world_size: W.
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


@dataclass
class ExpertParallelGroups:
    """This rank's process groups on the mesh.

    Attributes:
        mesh: the layout.
        expert_parallel: the EP group (tokens move over it); pass it to ``MoE.shard_experts``.
        expert_data_parallel: the EDP group expert gradients are summed over (``None`` when
            ``D == 1``: nothing to reduce).
        edp_rank: this rank's index in its EDP group.
    """

    mesh: ExpertParallelMesh
    expert_parallel: ExpertParallelGroup
    expert_data_parallel: object | None
    edp_rank: int


def build_process_groups(mesh: ExpertParallelMesh, rank: int) -> ExpertParallelGroups:
    """Create the EP and EDP process groups of ``mesh`` (a collective: every rank must call it).

    ``torch.distributed.new_group`` must be called by every rank for every group, in the same
    order, so all EP groups are created first, then all EDP groups; a group that is the whole world
    reuses ``WORLD`` and a group of one rank is not created.

    Args:
        mesh: the layout; its world size must match the initialised process group.
        rank: this process's global rank.

    Returns:
        This rank's groups.

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialised or its world size differs.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_process_groups needs an initialised torch.distributed process group")
    if dist.get_world_size() != mesh.world_size:
        raise RuntimeError(
            f"the process group has world size {dist.get_world_size()} but the mesh was built for "
            f"world_size={mesh.world_size}; build the mesh from torch.distributed.get_world_size()"
        )
    edp_rank, ep_rank = mesh.coordinates(rank)
    ep_group = _new_groups(mesh.expert_parallel_groups(), edp_rank, mesh.world_size)
    edp_group = _new_groups(mesh.expert_data_parallel_groups(), ep_rank, mesh.world_size)
    return ExpertParallelGroups(
        mesh=mesh,
        expert_parallel=ExpertParallelGroup(group=ep_group, size=mesh.expert_parallel_size, rank=ep_rank),
        expert_data_parallel=edp_group,
        edp_rank=edp_rank,
    )


def _new_groups(groups: list[list[int]], mine: int, world_size: int) -> object | None:
    """Create every group (all ranks take part in each ``new_group``) and return group ``mine``."""
    if len(groups[0]) == 1:
        return None
    if len(groups[0]) == world_size:
        return dist.group.WORLD
    created = [dist.new_group(ranks) for ranks in groups]
    return created[mine]


__all__ = [
    "MESH_DIM_NAMES",
    "ExpertParallelGroups",
    "ExpertParallelMesh",
    "build_process_groups",
    "default_expert_parallel_size",
]
