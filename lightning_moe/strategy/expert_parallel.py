"""``ExpertParallelStrategy``: expert parallelism with FSDP2 (ZeRO-3) or replicated data parallelism.

Built on Lightning's ``ModelParallelStrategy`` (launchers, cluster environments, process group,
``configure_model`` on the meta device). What it adds:

- setup: the layout is validated before any collective, the world ``DeviceMesh`` is built
  (:class:`~lightning_moe.strategy.ParallelDims`), and :func:`~lightning_moe.strategy.parallelize`
  makes the expert weights DTensors sharded over the expert-parallel dim, applies activation
  checkpointing and FSDP2 (``fully_shard`` per router, expert group, transformer block and root,
  with ``MixedPrecisionPolicy`` from the Trainer's precision and ``CPUOffloadPolicy`` with
  ``cpu_offload``); a model built on the meta device is then materialised shard by shard, and
  replicas are made equal;
- gradients: FSDP2 reduces them by the placement table (experts summed over the
  expert-data-parallel group and divided by N), so any layout trains like one process on the
  global batch;
- clipping: ``gradient_clip_val`` with a norm that counts every shard once;
- checkpoints: ``torch.distributed.checkpoint`` directories with global metadata, written
  atomically, loadable at any layout; single files and the legacy expert-sharded directories load too;
- evaluation: every rank runs the same number of batches (see :meth:`process_dataloader`), so a
  rank that runs out early never leaves the others waiting in an all-to-all.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe.moe.layer import moe_layers
from lightning_moe.strategy.checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    is_distributed_checkpoint,
    load_distributed_checkpoint,
    load_full_into_sharded,
    read_full_checkpoint,
    save_distributed_checkpoint,
)
from lightning_moe.strategy.grads import clip_grad_norm_, expert_parameters
from lightning_moe.strategy.mesh import DATA_PARALLEL_MODES, ParallelDims, default_expert_parallel_size
from lightning_moe.strategy.parallelize import (
    ACTIVATION_CHECKPOINTING,
    ParallelizeConfig,
    materialize,
    parallelize,
    synchronize_replicas,
    validate_tensor_parallel,
)

STRATEGY_NAME = "expert_parallel"
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


class ExpertParallelStrategy(ModelParallelStrategy):
    """Expert parallelism (DeepSpeed-MoE / Z-code M3) combined with FSDP2 sharding or replicas.

    Ranks form the mesh ``(expert_data_parallel, expert_parallel)``, expert-parallel ranks
    consecutive (shared/DESIGN.md, "Parallel layout"; the placement table is in
    :mod:`lightning_moe.strategy.mesh`). Each MoE layer keeps ``num_experts / expert_parallel_size``
    experts per rank and exchanges tokens over its expert-parallel group with all-to-all.

    Usable as ``Trainer(strategy=ExpertParallelStrategy(...))``, as ``strategy="expert_parallel"``
    and from YAML (``class_path: lightning_moe.ExpertParallelStrategy``). Launching is
    Lightning's: a script re-launched per device, ``torchrun`` or SLURM.

    Args:
        expert_parallel_size: P, data-parallel ranks that split the experts of every MoE layer.
            ``None`` picks the largest P that divides the world size, every layer's
            ``num_experts`` and the devices of one node (all-to-all stays on a node's NVLink).
        data_parallel: ``"fsdp"`` (the default: ZeRO-3, parameters, gradients and optimizer state
            sharded, non-expert ones over all N data-parallel ranks, experts over their D
            expert-data-parallel ranks; the same speed as ``"ddp"`` on one node at a fraction of
            the memory) or ``"ddp"`` (replicas; experts split over P only).
        tensor_parallel_size: T, ranks that split attention heads and dense FFN widths
            (Megatron-style, the innermost mesh dim: keep it within a node). Each MoE layer then
            dispatches 1/T of the routed tokens per rank (DeepSpeed's rule). 1 (the default) is off.
        cpu_offload: keep sharded parameters, gradients and the optimizer step in host memory
            (FSDP2's ``CPUOffloadPolicy``; ZeRO-Offload).
        activation_checkpointing: ``None``, ``"full"`` (recompute every transformer block) or
            ``"experts"`` (recompute the expert FFN only, not the routing or the all-to-all).
        process_group_backend: ``"nccl"`` (CUDA default) or ``"gloo"`` (CPU default).
        timeout: timeout of collectives.

    Raises:
        ValueError: on an invalid setting, naming it. At setup, before any collective: if the
            world size or a MoE layer's ``num_experts`` is not divisible by the expert-parallel size.
    """

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        data_parallel: str = "fsdp",
        tensor_parallel_size: int = 1,
        cpu_offload: bool = False,
        activation_checkpointing: str | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
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
        if data_parallel not in DATA_PARALLEL_MODES:
            raise ValueError(f"data_parallel={data_parallel!r} is not supported; choose one of {DATA_PARALLEL_MODES}")
        if (
            isinstance(tensor_parallel_size, bool)
            or not isinstance(tensor_parallel_size, int)
            or tensor_parallel_size < 1
        ):
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} must be a positive integer (1: off)")
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing={activation_checkpointing!r} is not supported; choose None, 'full' "
                "(recompute every block) or 'experts' (recompute the expert FFN only)"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._requested_expert_parallel_size = expert_parallel_size
        self.data_parallel = data_parallel
        self.tensor_parallel_size = tensor_parallel_size
        self.cpu_offload = cpu_offload
        self.activation_checkpointing = activation_checkpointing
        self._dims: ParallelDims | None = None
        self._mesh: Any = None
        self._parallelized = False

    # ---------------------------------------------------------------------------------------------
    # layout

    @property
    def expert_parallel_size(self) -> int | None:
        """P in use after setup; before it, the requested value (``None``: chosen at setup)."""
        return self._dims.expert_parallel_size if self._dims is not None else self._requested_expert_parallel_size

    @property
    def parallel_dims(self) -> ParallelDims | None:
        """The degrees in use, after setup."""
        return self._dims

    @property
    @override
    def device_mesh(self) -> Any:
        """The world ``DeviceMesh`` (dims ``edp``, ``ep``, ``tp``; ``dp`` flattened), after setup."""
        if self._mesh is None:
            raise RuntimeError("ExpertParallelStrategy builds its device mesh at setup; it is not available yet")
        return self._mesh

    def resolve_dims(self, module: nn.Module, world_size: int, ranks_per_node: int) -> ParallelDims:
        """The layout this strategy would use for ``module``; raises on a misconfiguration.

        A pure function of its arguments: every rank reaches the same verdict, so a bad
        configuration fails everywhere before any collective and never hangs.

        Args:
            module: the model (its MoE layers decide the default size and are validated).
            world_size: W.
            ranks_per_node: processes per node (bounds the default size).

        Returns:
            The validated :class:`~lightning_moe.strategy.ParallelDims`.

        Raises:
            ValueError: if W or a layer's ``num_experts`` is not divisible by the size.
        """
        layers = [(name or "<root>", layer.num_experts) for name, layer in moe_layers(module)]
        T = self.tensor_parallel_size
        size = self._requested_expert_parallel_size
        if size is None:
            # over the data-parallel ranks (W / T), within a node's share of them
            size = default_expert_parallel_size(
                max(world_size // T, 1), max(ranks_per_node // T, 1), [e for _, e in layers]
            )
        dims = ParallelDims(world_size, size, T, self.data_parallel)
        dims.validate_num_experts(layers)
        validate_tensor_parallel(module, T)
        return dims

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dims = self._dims
        if dims is None:
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        coords = dims.coordinates(self.global_rank)
        rank = coords["edp"] * dims.expert_parallel_size + coords["ep"]  # TP ranks read the same batch
        return {"num_replicas": dims.data_parallel_size, "rank": rank}

    @override
    def setup_environment(self) -> None:
        if self.cpu_offload and self.root_device.type != "cuda":
            raise ValueError(
                f"cpu_offload=True moves the training state of a GPU to host memory, but the device is "
                f"{self.root_device}; use accelerator='gpu', or cpu_offload=False on CPU"
            )
        world_size = self.num_nodes * self.num_processes
        # Fail before the process group exists when the model is already built.
        if self.lightning_module is not None and any(True for _ in moe_layers(self.lightning_module)):
            self.resolve_dims(self.lightning_module, world_size, self.num_processes)
        # ModelParallelStrategy builds a (data_parallel, tensor_parallel) mesh of its own here; ours,
        # which needs the model's MoE layers, is built in setup().
        self._data_parallel_size, self._tensor_parallel_size = world_size, 1
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        precision = _precision_flag(self.precision_plugin)
        module = self.lightning_module
        assert module is not None
        if not self._parallelized:
            if any(isinstance(m, FSDPModule) for m in self.model.modules()):
                raise RuntimeError(
                    f"{type(module).__name__} was already sharded by another strategy instance; run fit, validate, "
                    "test and predict with the same Trainer (its strategy keeps the layout), or build a new module"
                )
            dims = self.resolve_dims(module, self.world_size, self.num_processes)
            if self._requested_expert_parallel_size is None:
                rank_zero_info(
                    f"ExpertParallelStrategy: expert_parallel_size={dims.expert_parallel_size} (chosen: the largest "
                    f"size dividing the world size {dims.world_size}, every layer's num_experts and "
                    f"{self.num_processes} devices per node)"
                )
            self._dims = dims
            self._mesh = dims.build_mesh(self.root_device.type)
            module._device_mesh = self._mesh
            if precision == "bf16-true":
                self.model = self.precision_plugin.convert_module(self.model)
            mixed = precision == "bf16-mixed"
            config = ParallelizeConfig(
                dims=dims,
                mesh=self._mesh,
                activation_checkpointing=self.activation_checkpointing,
                cpu_offload=self.cpu_offload,
                param_dtype=torch.bfloat16 if mixed else None,
                reduce_dtype=torch.float32 if mixed else None,
            )
            parallelize(self.model, config)
            init_device = torch.device("cpu") if self.cpu_offload else self.root_device
            materialize(self.model, init_device)
            self._move_to_device()
            synchronize_replicas(self.model)
            self._parallelized = True
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _move_to_device(self) -> None:
        assert self.model is not None
        if not self.cpu_offload:
            self.model.to(self.root_device)
            return
        # Offload: sharded parameters stay in host memory (FSDP2 moves them per unit); buffers go to the GPU.
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.root_device)

    @override
    def model_to_device(self) -> None:
        self._move_to_device()

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Modules built here (``configure_model``, ``trainer.init_module()``) go on the meta device.

        Each rank then materialises only its own shards at setup (``empty_init=False`` builds them
        in host memory instead).
        """
        with (
            torch.device("meta") if empty_init is not False else nullcontext(),
            self.precision_plugin.tensor_init_context(),
        ):
            yield

    # ---------------------------------------------------------------------------------------------
    # precision and clipping

    @property
    @override
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else _ShardedPrecision()

    @precision_plugin.setter
    @override
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        self._precision_plugin = None if precision_plugin is None else _with_sharded_clipping(precision_plugin)

    # ---------------------------------------------------------------------------------------------
    # evaluation: the same number of batches on every rank

    @override
    def process_dataloader(self, dataloader: Iterable) -> Iterable:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        fitting_train = trainer is not None and trainer.training
        if self._dims is None or self._dims.expert_parallel_size == 1 or fitting_train or self.world_size == 1:
            return dataloader
        try:
            len(dataloader)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: the user's loader must be even
            return dataloader
        return _EvenBatches(dataloader, self)

    # ---------------------------------------------------------------------------------------------
    # checkpoints

    def _expert_keys(self) -> dict[str, tuple[str, int]]:
        module = self.lightning_module
        assert module is not None
        layer_of = {name: layer for name, layer in moe_layers(module)}
        out = {}
        for key, _ in expert_parameters(module):
            layer_name = key.rsplit(".experts.", 1)[0] if ".experts." in key else ""
            out[key] = (layer_name, layer_of[layer_name].num_experts)
        return out

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write a distributed checkpoint directory (every rank calls this); atomic.

        See :mod:`lightning_moe.strategy.checkpoint` for the layout.
        """
        if storage_options is not None:
            raise TypeError("ExpertParallelStrategy.save_checkpoint(storage_options=...) is not supported")
        path = self.broadcast(str(filepath))
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
            tensors[f"optimizer_{index}"] = state
        checkpoint[FORMAT_KEY] = {
            "format_version": FORMAT_VERSION,
            "layout": str(self._dims),
            "experts": self._expert_keys(),
        }
        save_distributed_checkpoint(
            path, tensors, checkpoint, is_rank_zero=self.is_global_zero, barrier=lambda name: self.barrier(name)
        )

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a distributed checkpoint directory, a legacy expert-sharded directory or a single file.

        Each rank keeps its own shards. Every rank checks every expert first, so a missing or
        duplicated expert fails on all ranks alike, before any collective.
        """
        assert self.model is not None
        path = self.broadcast(str(checkpoint_path))
        module = self.lightning_module
        assert module is not None
        optimizers = [getattr(opt, "_optimizer", opt) for opt in self.optimizers]
        if is_distributed_checkpoint(path):
            return load_distributed_checkpoint(
                path, self.model, optimizers, self._expert_keys(), strict=module.strict_loading
            )
        checkpoint = read_full_checkpoint(path)
        load_full_into_sharded(checkpoint, self.model, optimizers, strict=module.strict_loading)
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(
                STRATEGY_NAME,
                cls,
                description="Expert parallelism for MoE models with FSDP2 sharding (ZeRO-3) of the rest",
            )


class _EvenBatches:
    """A dataloader that yields the same number of batches on every rank.

    Ranks with fewer batches (e.g. Lightning's unpadded predict sampler) continue with empty
    batches (every tensor sliced to zero rows), so that every rank takes part in every
    all-to-all; predictions of empty batches are empty.
    """

    def __init__(self, dataloader: Iterable, strategy: ExpertParallelStrategy) -> None:
        self.dataloader = dataloader
        self.strategy = strategy
        self._length: int | None = None

    def _max_length(self) -> int:
        """The most batches any rank has (one collective, the first time every rank asks)."""
        if self._length is None:
            count = torch.tensor(len(self.dataloader), device=self.strategy.root_device)  # type: ignore[arg-type]
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            self._length = int(count)
        return self._length

    def __len__(self) -> int:
        return self._max_length()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataloader, name)

    def __iter__(self) -> Iterator[Any]:
        total = self._max_length()
        last = None
        count = 0
        for batch in self.dataloader:
            last = batch
            count += 1
            yield batch
        for _ in range(total - count):
            yield _empty_like(last)


def _empty_like(batch: Any) -> Any:
    """``batch`` with every tensor cut to zero rows and every list emptied (structure kept)."""
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        items = [_empty_like(v) for v in batch]
        if batch and all(not isinstance(v, (Tensor, dict, list, tuple)) for v in batch):
            return type(batch)()
        return type(batch)(items)
    return batch


# --------------------------------------------------------------------------------------------------
# precision plugins with sharded gradient clipping


class _ShardedClipping:
    """``clip_grad_by_norm`` with a norm over every shard exactly once (the strategy's clipping)."""

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float | int) -> None:
        clip_grad_norm_(self.main_params(optimizer), float(clip_val))  # type: ignore[attr-defined]


class _ShardedPrecision(_ShardedClipping, Precision):
    """``32-true`` under ExpertParallelStrategy."""


class _ShardedMixedPrecision(_ShardedClipping, MixedPrecision):
    """``bf16-mixed`` under ExpertParallelStrategy (FSDP2 gathers bfloat16 weights; autocast on top)."""


class _ShardedHalfPrecision(_ShardedClipping, HalfPrecision):
    """``bf16-true`` under ExpertParallelStrategy."""


def _precision_flag(plugin: Precision) -> str:
    return getattr(plugin, "precision", "32-true")


def _with_sharded_clipping(plugin: Precision) -> Precision:
    if isinstance(plugin, _ShardedClipping):
        return plugin
    flag = _precision_flag(plugin)
    if flag not in PRECISIONS or type(plugin) not in (Precision, MixedPrecision, HalfPrecision):
        fix = " (fp16 needs loss scaling whose inf checks FSDP2 does not agree across ranks)" if "16-" in flag else ""
        raise ValueError(
            f"ExpertParallelStrategy does not support precision={flag!r} ({type(plugin).__name__}){fix}; use "
            f"precision='bf16-mixed' (or one of {PRECISIONS})"
        )
    if isinstance(plugin, MixedPrecision):
        return _ShardedMixedPrecision(flag, plugin.device, plugin.scaler)  # type: ignore[arg-type]
    if isinstance(plugin, HalfPrecision):
        return _ShardedHalfPrecision(flag)  # type: ignore[arg-type]
    return _ShardedPrecision()


def register_expert_parallel_strategy() -> None:
    """Register ``"expert_parallel"`` in Lightning's strategy registry (idempotent)."""
    ExpertParallelStrategy.register_strategies(StrategyRegistry)


# Importing lightning_moe makes Trainer(strategy="expert_parallel") work.
register_expert_parallel_strategy()

__all__ = ["PRECISIONS", "STRATEGY_NAME", "ExpertParallelStrategy", "register_expert_parallel_strategy"]
