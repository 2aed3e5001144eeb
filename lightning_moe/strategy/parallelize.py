"""Apply tensor parallelism, expert parallelism, activation checkpointing and FSDP2 to a plain model.

One place, torchtitan's order: tensor parallelism, expert parallelism, activation checkpointing,
FSDP2. The model stays a plain ``nn.Module``; the placement of every parameter is the table of
:mod:`lightning_moe.strategy.mesh`.

FSDP2 units (what one all-gather brings in; :mod:`lightning_moe.strategy.memory` counts them):

- each MoE layer's routed experts (sharded over the expert-data-parallel ranks only, with the
  gradient divided by N instead of D);
- each transformer block (attention, norms, dense FFN or the MoE layer's router and shared
  experts);
- the root: the smallest module with a ``forward`` that holds every block and MoE layer
  (embeddings, positions, final norms, an untied head). Its ``encode``/``decode`` methods, where
  they exist (the encoder-decoder), are FSDP entry points too.

Why the router is not a unit of its own: a unit's backward collectives run where autograd reaches
its inputs and outputs. For the experts that is a fixed point between the two all-to-alls of the
layer, but the router's input gradient is ready at a data-dependent moment, so its reduce-scatter
would run in a different order relative to the next block's all-gather on different ranks, and
collectives on the same group in different orders hang. Inside the block unit its gradient is
reduced with the block's. The router still computes in float32 (from the gathered weight).

A parameter outside the root is an error: it would be neither sharded nor reduced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from lightning_moe.moe.backend import local_tensor
from lightning_moe.moe.dispatch import ExpertParallelGroup
from lightning_moe.moe.experts import WEIGHT_NAMES as EXPERT_WEIGHT_NAMES
from lightning_moe.moe.layer import MoE, moe_layers
from lightning_moe.strategy.mesh import ParallelDims, fsdp_shard_dim

ACTIVATION_CHECKPOINTING: tuple[str | None, ...] = (None, "full", "experts")
ROOT_FORWARD_METHODS: tuple[str, ...] = ("encode", "decode")


@dataclass
class ParallelizeConfig:
    """How :func:`parallelize` lays a model out.

    Attributes:
        dims: the parallel degrees.
        mesh: the world mesh of :meth:`ParallelDims.build_mesh`.
        activation_checkpointing: ``None``, ``"full"`` (every transformer block recomputed in the
            backward; it keeps only its inputs) or ``"experts"`` (each MoE layer's expert FFN
            recomputed; routing and the all-to-all are not repeated).
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and the
            optimizer step in host memory.
        param_dtype: dtype FSDP2 gathers parameters in for compute (``None``: as stored).
        reduce_dtype: dtype gradients are reduced in (``None``: the gathered dtype).
    """

    dims: ParallelDims
    mesh: DeviceMesh
    activation_checkpointing: str | None = None
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing={self.activation_checkpointing!r} is not supported; choose None, "
                "'full' (recompute every block) or 'experts' (recompute the expert FFN only)"
            )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` in forward order: the modules FSDP2 and checkpointing wrap.

    A block is a module of a ``ModuleList`` whose class name ends in ``Block`` (our
    ``TransformerBlock``, the Hugging Face families' ``DecoderBlock``), encoder before decoder.
    """
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(m for m in module if type(m).__name__.endswith("Block"))
    return blocks


def _checkpoint_block(block: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute ``block``'s forward in the backward (in place: names and state-dict keys unchanged).

    The aux losses of the block's MoE layers leave the checkpointed function as outputs, so they
    keep their gradient with reentrant checkpointing too (whose forward runs without autograd).
    Outside training (``torch.is_grad_enabled()`` False) the block runs as it is.
    """
    if getattr(block, "_lightning_moe_checkpointed", False):
        return
    forward = block.forward
    layers = [m for m in block.modules() if isinstance(m, MoE)]

    def run(names: tuple[str, ...], *values: Any) -> tuple[Any, ...]:
        n = len(values) - len(names)
        out = forward(*values[:n], **dict(zip(names, values[n:], strict=True)))
        aux = tuple(m.aux_loss for m in layers)
        return (out, *aux) if all(a is not None for a in aux) else (out,)

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        names = tuple(kwargs)
        outs = checkpoint(run, names, *args, *kwargs.values(), use_reentrant=use_reentrant)
        for layer, aux in zip(layers, outs[1:], strict=False):
            layer.aux_loss = aux
        return outs[0]

    block.forward = checkpointed_forward  # type: ignore[method-assign]
    block._lightning_moe_checkpointed = True  # type: ignore[assignment]


def apply_activation_checkpointing(model: nn.Module, mode: str | None) -> None:
    """Checkpoint every transformer block (``"full"``) or every MoE layer's expert FFN (``"experts"``)."""
    if mode == "full":
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(
                f"activation_checkpointing='full' found no transformer block in {type(model).__name__} (a module "
                "of an nn.ModuleList whose class name ends in 'Block'); use 'experts' or None"
            )
        for block in blocks:
            _checkpoint_block(block)
    elif mode == "experts":
        for _, layer in moe_layers(model):
            layer.recompute_experts = True


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lightning_moe.models.decoder import Attention as DecoderAttention
    from lightning_moe.models.decoder import LatentAttention
    from lightning_moe.models.transformer import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, DecoderAttention, LatentAttention))]


def validate_tensor_parallel(model: nn.Module, size: int) -> None:
    """Check that ``model``'s attention heads and dense FFN widths split over ``size`` ranks.

    Raises:
        ValueError: naming the module and the value that does not divide, or an attention kind
            that has no tensor-parallel plan (DeepSeek's latent attention, whole-projection q/k norms).
    """
    from lightning_moe.models.decoder import LatentAttention
    from lightning_moe.models.transformer import FeedForward

    if size == 1:
        return
    fix = "choose a tensor_parallel_size that divides it, or tensor_parallel_size=1"
    for name, module in _attention_modules(model):
        if isinstance(module, LatentAttention):
            raise ValueError(
                f"{name} is multi-head latent attention (DeepSeek-V3), which has no tensor-parallel plan here; use "
                "tensor_parallel_size=1 for this model"
            )
        if getattr(module, "qk_norm_mode", None) == "full":
            raise ValueError(
                f"{name} normalises whole q/k projections (qk_norm='full'), which cannot be split over ranks; use "
                "tensor_parallel_size=1 for this model"
            )
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(module, attr, None)
            if heads is not None and heads % size != 0:
                raise ValueError(f"{name} has {attr}={heads}, not divisible by tensor_parallel_size={size}; {fix}")
    for name, module in model.named_modules():
        if isinstance(module, FeedForward) and module.w1.out_features % size != 0:
            raise ValueError(
                f"{name} has d_ff={module.w1.out_features}, not divisible by tensor_parallel_size={size}; {fix}"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism of attention and dense FFNs over ``tp_mesh``.

    With ``torch.distributed.tensor.parallel``: q/k/v column-parallel and the output projection
    row-parallel (each rank computes ``n_heads / TP`` heads), dense FFNs ``w1``/``w3``
    column-parallel and ``w2`` row-parallel; the activations between blocks stay replicated.
    Embeddings, norms, the output projection, routers and shared experts stay replicated (no
    vocabulary parallelism), and each MoE layer dispatches its ``1/TP`` share of the routed pairs
    (:meth:`~lightning_moe.MoE.set_tensor_parallel`).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_moe.models.transformer import FeedForward

    size = tp_mesh.size()
    if size == 1:
        return
    validate_tensor_parallel(model, size)
    for _, module in _attention_modules(model):
        out = "out_proj" if hasattr(module, "out_proj") else "o_proj"
        plan = {
            "q_proj": ColwiseParallel(),
            "k_proj": ColwiseParallel(),
            "v_proj": ColwiseParallel(),
            out: RowwiseParallel(),
        }
        parallelize_module(module, tp_mesh, plan)
        module.n_heads //= size
        if hasattr(module, "n_kv_heads"):
            module.n_kv_heads //= size
    for _, module in model.named_modules():
        if isinstance(module, FeedForward):
            plan = {"w1": ColwiseParallel(), "w2": RowwiseParallel()}
            if module.w3 is not None:
                plan["w3"] = ColwiseParallel()
            parallelize_module(module, tp_mesh, plan)
    for _, layer in moe_layers(model):
        layer.set_tensor_parallel(tp_mesh)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Make every MoE layer's expert weights DTensors sharded on dim 0 over ``ep_mesh``.

    Each rank keeps the experts ``[rank * L, (rank + 1) * L)`` of the weights it holds now (no
    communication), and the layer exchanges tokens over the mesh's process group.
    """
    size = ep_mesh.size()
    if size == 1:
        return
    rank = ep_mesh.get_local_rank()
    ep = ExpertParallelGroup(group=ep_mesh.get_group(), size=size, rank=rank)
    for name, layer in moe_layers(model):
        if isinstance(layer.experts.w1, DTensor) or layer.num_local_experts != layer.num_experts:
            raise ValueError(f"MoE layer {name!r} is already expert-parallel; parallelize a model once")
        for weight_name in EXPERT_WEIGHT_NAMES:
            param = getattr(layer.experts, weight_name)
            if param is None:
                continue
            L = param.shape[0] // size
            if param.is_meta:
                local = torch.empty((L, *param.shape[1:]), dtype=param.dtype, device="meta")
            else:
                local = param.detach()[rank * L : (rank + 1) * L]
            dtensor = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(layer.experts, weight_name, nn.Parameter(dtensor, requires_grad=param.requires_grad))
        layer.set_expert_parallel(ep)


def find_root(model: nn.Module) -> nn.Module:
    """The smallest module with a ``forward`` that holds every transformer block and MoE layer of ``model``."""
    names = [name for name, m in model.named_modules() if m in set(transformer_blocks(model))]
    names += [name for name, _ in moe_layers(model)]
    if not names:
        return model
    parts = [n.split(".") if n else [] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    units = set(names)  # blocks and MoE layers are FSDP units of their own: the root is above them
    while common:
        root = model.get_submodule(".".join(common))
        if ".".join(common) not in units and not isinstance(root, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            return root
        common.pop()
    return model


def parallelize(model: nn.Module, config: ParallelizeConfig) -> nn.Module:
    """Lay ``model`` out on ``config.mesh``: expert parallelism, checkpointing, then FSDP2 units.

    Args:
        model: a plain module (a LightningModule or the model inside it); on the meta device or
            materialised. Every rank must pass the same architecture.
        config: the layout.

    Returns:
        The FSDP root module (a submodule of ``model``, or ``model`` itself).

    Raises:
        ValueError: if a MoE layer's ``num_experts`` is not divisible by the expert-parallel size, or
            a parameter lies outside the FSDP root.
    """
    dims, mesh = config.dims, config.mesh
    dims.validate_num_experts([(name or "<root>", layer.num_experts) for name, layer in moe_layers(model)])
    root = find_root(model)
    outside = _parameters_outside(model, root)
    if outside:
        raise ValueError(
            f"parameters {outside[:5]} are outside {type(root).__name__}, the module whose forward runs every "
            "transformer block and MoE layer; ExpertParallelStrategy would neither shard nor reduce them. Move them "
            "into that module (or call it from your LightningModule's forward)"
        )
    apply_tensor_parallel(model, mesh["tp"])
    apply_expert_parallel(model, mesh["ep"])
    apply_activation_checkpointing(model, config.activation_checkpointing)
    _apply_fsdp(model, root, config)
    return root


def _parameters_outside(model: nn.Module, root: nn.Module) -> list[str]:
    inside = {id(p) for p in root.parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in inside]


def _shard_largest_dim(shards: int):  # type: ignore[no-untyped-def]
    """FSDP2's ``shard_placement_fn``: :func:`~lightning_moe.strategy.mesh.fsdp_shard_dim` of the local shape."""

    def placement(param: nn.Parameter) -> Shard:
        return Shard(fsdp_shard_dim(local_tensor(param).shape, shards))

    return placement


def _apply_fsdp(model: nn.Module, root: nn.Module, config: ParallelizeConfig) -> None:
    dims, mesh = config.dims, config.mesh
    ddp = dims.data_parallel == "ddp"
    dense_mesh = mesh["dp", "shard"] if ddp else mesh["dp"]
    # An expert's data-parallel ranks: its expert-data-parallel replicas and, with tensor parallelism,
    # the TP ranks (each dispatched a different share of the tokens to it).
    experts_dim = "edp_tp" if dims.tensor_parallel_size > 1 else "edp"
    expert_mesh = mesh[experts_dim, "shard"] if ddp else mesh[experts_dim]
    reshard = not ddp
    mp = MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype)
    offload: OffloadPolicy = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()
    dense_shards = 1 if ddp else dims.data_parallel_size
    expert_shards = 1 if ddp else dims.expert_data_parallel_size * dims.tensor_parallel_size
    common: dict[str, Any] = {"offload_policy": offload, "reshard_after_forward": reshard}
    # gloo has no pre-multiplied sum for the divide factor: reduce with a plain sum, then divide. (Not
    # where the shard group has one rank: FSDP2 then divides in its copy and would divide twice.)
    sum_only = dist.get_backend() != "nccl" and expert_shards > 1
    for _, layer in moe_layers(model):
        experts = layer.experts
        fully_shard(
            experts, mesh=expert_mesh, mp_policy=mp, shard_placement_fn=_shard_largest_dim(expert_shards), **common
        )
        assert isinstance(experts, FSDPModule)
        # The DESIGN rule: expert gradients summed over the EDP group and divided by N (not D).
        experts.set_gradient_divide_factor(float(dims.data_parallel_size))
        if sum_only:
            experts.set_force_sum_reduction_for_comms(True)
        register_fsdp_forward_method(experts, "fused_forward")
    for block in transformer_blocks(model):
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, shard_placement_fn=_shard_largest_dim(dense_shards), **common)
    fully_shard(
        root, mesh=dense_mesh, mp_policy=mp, shard_placement_fn=_shard_largest_dim(dense_shards),
        offload_policy=offload, reshard_after_forward=False,
    )  # fmt: skip
    for method in ROOT_FORWARD_METHODS:
        if callable(getattr(root, method, None)):
            register_fsdp_forward_method(root, method)


# --------------------------------------------------------------------------------------------------
# materialisation and replica consistency


def _post_order(module: nn.Module, seen: set[int] | None = None) -> Iterator[nn.Module]:
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


_RANDOM_METHODS = frozenset(
    getattr(Tensor, name)
    for name in ("normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_")
)
_INIT_FUNCTIONS = frozenset(
    fn for name, fn in vars(nn.init).items() if callable(fn) and name.endswith("_") and not name.startswith("_")
)


class _FullTensorInit(torch.overrides.TorchFunctionMode):
    """Initialisers on a DTensor draw the whole tensor and keep this rank's region of it.

    So an initialisation after ``to_empty`` gives the same values as on one device with the same
    seed, and the shards of one tensor are parts of one draw (on CPU, DTensor's own random ops
    would repeat the same numbers in every shard). Transient memory: one full parameter at a time.
    Replicas drawn with different seeds are made equal afterwards by :func:`synchronize_replicas`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        # nn.init functions pass their tensor as a keyword (``tensor=``), Tensor methods as ``self``.
        target = args[0] if args else kwargs.get("tensor")
        if (func in _RANDOM_METHODS or func in _INIT_FUNCTIONS) and isinstance(target, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = target.to_local()
            full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
            if args:
                args = (full, *args[1:])
            else:
                kwargs["tensor"] = full
            with torch.no_grad():
                func(*args, **kwargs)
                shape, offset = compute_local_shape_and_global_offset(
                    target.shape, target.device_mesh, target.placements
                )
                region = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                local.copy_(full[region].reshape(local.shape))
            return target
        return func(*args, **kwargs)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a (partly) meta-device model on ``device`` and initialise it with its ``reset_parameters``.

    Each rank allocates only its shards. Modules are initialised children first, in registration
    order, then their parents (so a model-level ``reset_parameters`` has the last word, as when
    the model is built normally): with the same seed the result equals the model built on one
    device.

    Raises:
        ValueError: naming a module that owns meta-device tensors but has no ``reset_parameters``.
    """
    owners = [
        m for m in model.modules() if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    ]
    if not owners:
        return
    missing = sorted({type(m).__name__ for m in owners if not callable(getattr(m, "reset_parameters", None))})
    if missing:
        raise ValueError(
            f"{', '.join(missing)} hold(s) parameters or buffers on the meta device but define no reset_parameters(); "
            "define reset_parameters() to initialise them, or build the model outside the meta device"
        )
    model.to_empty(device=device)
    with _FullTensorInit():
        for module in _post_order(model):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def synchronize_replicas(model: nn.Module) -> None:
    """Make every replica equal to the first: parameters along their replicated mesh dims, buffers from rank 0.

    A collective over every rank (each in the same order). Needed where a model was built with
    rank-dependent seeds: replicated parameters (``data_parallel="ddp"``) would otherwise start
    apart and silently diverge.
    """
    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, DTensor):
                dist.broadcast(param.data, src=0)
                continue
            mesh = param.device_mesh
            for dim, placement in enumerate(param.placements):
                if placement.is_replicate() and mesh.size(dim) > 1:
                    group = mesh.get_group(dim)
                    dist.broadcast(param.to_local(), src=dist.get_global_rank(group, 0), group=group)
        for buffer in model.buffers():
            if not buffer.is_meta:
                dist.broadcast(buffer, src=0)


__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "ParallelizeConfig",
    "apply_activation_checkpointing",
    "apply_expert_parallel",
    "find_root",
    "materialize",
    "parallelize",
    "synchronize_replicas",
    "transformer_blocks",
]
