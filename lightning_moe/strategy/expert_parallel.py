"""``ExpertParallelStrategy``: DDP for the dense parameters, expert parallelism for the experts.

What it adds to Lightning's ``DDPStrategy`` (launchers, cluster environments, NCCL/gloo are DDP's):

- setup: validate the layout (before any collective), build the ``(expert_data_parallel,
  expert_parallel)`` mesh, hand every MoE layer its expert-parallel group (``MoE.shard_experts``)
  before the optimizer is built, and keep expert weights out of DDP;
- backward: expert gradients scaled by ``1 / P`` and averaged over the expert-data-parallel group
  on the step that synchronises (:mod:`lightning_moe.strategy.grads`);
- clipping: ``gradient_clip_val`` with a norm that counts every expert shard once;
- checkpoints: one directory, every expert stored once by global index, loadable at any expert
  parallel size (:mod:`lightning_moe.strategy.checkpoint`);
- teardown: experts gathered back, so the module is whole again after ``fit`` (as after DDP).

The placement of every parameter is the table in :mod:`lightning_moe.strategy.mesh`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_moe.moe.layer import moe_layers
from lightning_moe.strategy.checkpoint import (
    expert_layer_specs,
    load_checkpoint,
    optimizer_expert_params,
    write_sharded_checkpoint,
)
from lightning_moe.strategy.grads import (
    clip_grad_norm_,
    expert_parameters,
    reduce_expert_gradients,
    scale_expert_gradients,
)
from lightning_moe.strategy.mesh import (
    ExpertParallelGroups,
    ExpertParallelMesh,
    build_process_groups,
    default_expert_parallel_size,
)

STRATEGY_NAME = "expert_parallel"


class ExpertParallelStrategy(DDPStrategy):
    """Expert parallelism (DeepSpeed-MoE / Z-code M3 layout) on top of Lightning's DDP.

    Ranks form the mesh ``(expert_data_parallel, expert_parallel)`` with expert-parallel ranks
    consecutive. Each MoE layer keeps ``num_experts / expert_parallel_size`` experts per rank and
    exchanges tokens over its expert-parallel group with all-to-all; everything else is data
    parallel. A run at any expert-parallel size computes the same updates as one process on the
    same global batch (dropless routing; the aux loss and capacity are per rank, as in DeepSpeed).

    Usable as ``Trainer(strategy=ExpertParallelStrategy(...))``, as ``strategy="expert_parallel"``
    (``"expert_parallel_spawn"`` for the spawn launcher) and from YAML (``class_path:
    lightning_moe.ExpertParallelStrategy``). Launching is DDP's: a script re-launched per device,
    ``torchrun`` or SLURM through Lightning's cluster environments.

    Args:
        expert_parallel_size: P, ranks that split the experts of every MoE layer. ``None`` picks the
            largest P that divides the world size, every layer's ``num_experts`` and the devices of
            one node (all-to-all stays on a node's NVLink); 1 is plain data parallelism.
        accelerator: see ``DDPStrategy``.
        parallel_devices: see ``DDPStrategy``.
        cluster_environment: see ``DDPStrategy``.
        checkpoint_io: writes and reads the checkpoint files (default: ``torch.save``).
        precision_plugin: see ``DDPStrategy``.
        process_group_backend: ``"nccl"`` (CUDA default) or ``"gloo"`` (CPU default).
        timeout: timeout of collectives.
        start_method: ``"popen"`` (re-launch the script, default), ``"spawn"``, ``"fork"`` or
            ``"forkserver"``.
        **kwargs: passed to ``torch.nn.parallel.DistributedDataParallel``.

    Raises:
        ValueError: if ``expert_parallel_size`` is not a positive integer. At setup, before any
            collective: if the world size or a MoE layer's ``num_experts`` is not divisible by it.
    """

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        if expert_parallel_size is not None and (
            isinstance(expert_parallel_size, bool)
            or not isinstance(expert_parallel_size, int)
            or expert_parallel_size < 1
        ):
            raise ValueError(
                f"expert_parallel_size={expert_parallel_size!r} must be a positive integer, or None to choose it "
                "from the world size and the experts"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self._requested_expert_parallel_size = expert_parallel_size
        self._groups: ExpertParallelGroups | None = None
        self._expert_params: list[nn.Parameter] = []
        self._grad_hooks: list[RemovableHandle] = []
        self._clipping_plugin: Precision | None = None
        self._failed = False

    # ---------------------------------------------------------------------------------------------
    # layout

    @property
    def expert_parallel_size(self) -> int | None:
        """P in use after setup; before it, the requested value (``None``: chosen at setup)."""
        if self._groups is not None:
            return self._groups.mesh.expert_parallel_size
        return self._requested_expert_parallel_size

    @property
    def mesh(self) -> ExpertParallelMesh | None:
        """The rank layout, after setup."""
        return self._groups.mesh if self._groups is not None else None

    @property
    def process_groups(self) -> ExpertParallelGroups | None:
        """This rank's expert-parallel and expert-data-parallel groups, after setup."""
        return self._groups

    def resolve_mesh(self, module: nn.Module, world_size: int, ranks_per_node: int) -> ExpertParallelMesh:
        """The mesh this strategy would use for ``module``; raises on a misconfiguration.

        A pure function of its arguments: every rank reaches the same verdict, so a bad
        configuration fails everywhere before any collective and never hangs.

        Args:
            module: the model (its MoE layers decide the default size and are validated).
            world_size: W.
            ranks_per_node: processes per node (bounds the default size).

        Returns:
            The validated :class:`~lightning_moe.strategy.ExpertParallelMesh`.

        Raises:
            ValueError: if W or a layer's ``num_experts`` is not divisible by the size.
        """
        layers = [(name or "<root>", layer.num_experts) for name, layer in moe_layers(module)]
        size = self._requested_expert_parallel_size
        if size is None:
            size = default_expert_parallel_size(world_size, ranks_per_node, [e for _, e in layers])
        mesh = ExpertParallelMesh(world_size=world_size, expert_parallel_size=size)
        mesh.validate_num_experts(layers)
        return mesh

    @override
    def setup_environment(self) -> None:
        # Fail before the process group exists when the model is already built.
        if self.lightning_module is not None:
            self.resolve_mesh(self.lightning_module, self.num_nodes * self.num_processes, self.num_processes)
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        self._failed = False
        self._setup_expert_parallel()
        super().setup(trainer)
        self._install_clipping()

    def _setup_expert_parallel(self) -> None:
        module = self.lightning_module
        assert module is not None
        mesh = self.resolve_mesh(module, self.world_size, self.num_processes)
        if self._groups is None or self._groups.mesh != mesh:
            self._groups = build_process_groups(mesh, self.global_rank)
        if self._requested_expert_parallel_size is None:
            rank_zero_info(
                f"ExpertParallelStrategy: expert_parallel_size={mesh.expert_parallel_size} (chosen: the largest size "
                f"dividing the world size {mesh.world_size}, every layer's num_experts and {self.num_processes} "
                "devices per node)"
            )
        ep = self._groups.expert_parallel
        if ep.size > 1:
            for _, layer in moe_layers(module):
                layer.shard_experts(ep)
        named = expert_parameters(module)
        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
        module._ddp_params_and_buffers_to_ignore = sorted(ignored | {name for name, _ in named})
        self._expert_params = [param for _, param in named]

    # ---------------------------------------------------------------------------------------------
    # gradients

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        # After model_to_device: the hooks live on the parameters that will be trained.
        for handle in self._grad_hooks:
            handle.remove()
        assert self.lightning_module is not None
        self._expert_params = [param for _, param in expert_parameters(self.lightning_module)]
        self._grad_hooks = scale_expert_gradients(self._expert_params, self.expert_parallel_size or 1)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        model = self.model
        if not isinstance(model, DistributedDataParallel) or not model.require_backward_grad_sync:
            return  # accumulating: expert gradients stay local until the step that synchronises
        assert self._groups is not None
        reduce_expert_gradients(
            self._expert_params, self._groups.expert_data_parallel, self._groups.mesh.expert_data_parallel_size
        )

    def _install_clipping(self) -> None:
        # Lightning clips through the precision plugin (``clip_grad_by_norm``); replace that method
        # on this run's plugin instance with the expert-aware norm, and restore it at teardown.
        plugin = self.precision_plugin
        groups = self._groups
        assert groups is not None
        expert_ids = {id(p) for p in self._expert_params}
        ep_group = groups.expert_parallel.group if groups.expert_parallel.size > 1 else None

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            clip_grad_norm_(plugin.main_params(optimizer), clip_val, expert_ids, ep_group)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
        self._clipping_plugin = plugin

    # ---------------------------------------------------------------------------------------------
    # checkpoints

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Load after sharding: each rank reads only the rows of its own experts.
        return True

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write a checkpoint directory: ``common.pt`` and one file of experts per EP rank.

        Called on every rank. See :mod:`lightning_moe.strategy.checkpoint` for the format.
        """
        module = self.lightning_module
        assert module is not None
        specs = expert_layer_specs(module)
        maps = [optimizer_expert_params(opt, module) for opt in self.optimizers]
        if self.is_global_zero:
            # A shard of an earlier layout left in the directory would be read as a duplicate.
            self.checkpoint_io.remove_checkpoint(filepath)
        self.barrier("ExpertParallelStrategy.save_checkpoint")
        sharded = any(spec.num_local != spec.num_experts for spec in specs)
        if sharded:
            assert self._groups is not None
            writes_shard = self._groups.edp_rank == 0
            ep = self._groups.expert_parallel
            shard = (ep.rank, ep.size) if writes_shard else None
        else:
            shard = (0, 1) if self.is_global_zero else None
        write_sharded_checkpoint(
            checkpoint,
            filepath,
            specs,
            maps,
            write_common=self.is_global_zero,
            shard=shard,
            checkpoint_io=self.checkpoint_io,
            storage_options=storage_options,
        )

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint directory or single file and keep this rank's experts.

        Every rank checks every expert, so a missing or duplicated expert fails on all ranks alike.
        """
        torch.cuda.empty_cache()
        module = self.lightning_module
        assert module is not None
        maps = [optimizer_expert_params(opt, module) for opt in self.optimizers] or None
        return load_checkpoint(
            checkpoint_path,
            expert_layer_specs(module),
            maps,
            checkpoint_io=self.checkpoint_io,
            weights_only=weights_only,
        )

    # ---------------------------------------------------------------------------------------------
    # teardown

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Other ranks may be gone: teardown must not start a collective.
        self._failed = True
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        if self._clipping_plugin is not None:
            self._clipping_plugin.__dict__.pop("clip_grad_by_norm", None)
            self._clipping_plugin = None
        module = self.lightning_module
        if module is not None and self._groups is not None and not self._failed:
            ep = self._groups.expert_parallel
            if ep.size > 1:
                for _, layer in moe_layers(module):
                    layer.unshard_experts()
        self._expert_params = []
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in ((STRATEGY_NAME, "popen"), (f"{STRATEGY_NAME}_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"Expert parallelism for MoE models over DDP, start_method={start_method!r}",
                    start_method=start_method,
                )


def register_expert_parallel_strategy() -> None:
    """Register ``"expert_parallel"`` and ``"expert_parallel_spawn"`` in Lightning's registry (idempotent)."""
    ExpertParallelStrategy.register_strategies(StrategyRegistry)


# Importing lightning_moe makes Trainer(strategy="expert_parallel") work.
register_expert_parallel_strategy()

__all__ = ["STRATEGY_NAME", "ExpertParallelStrategy", "register_expert_parallel_strategy"]
