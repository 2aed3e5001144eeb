"""Distributed checkpoints of :class:`~lightning_moe.ExpertParallelStrategy`: DCP shards with global metadata.

A checkpoint is a directory written by ``torch.distributed.checkpoint`` (DCP)::

    epoch=3-step=400.ckpt/
      .metadata          DCP: every tensor's global shape and which file holds which chunk
      __0_0.distcp ...   DCP: each rank's shards (a replicated shard is written once)
      meta.pt            rank 0: the rest of the Lightning checkpoint (loops, callbacks, schedulers,
                         hyper-parameters) and ``["expert_parallel_checkpoint"]``: format version, the layout it
                         was written at, ``{expert weight key: (MoE layer, num_experts)}``

Tensors are stored under ``state_dict.<parameter>`` and ``optimizer_<i>.state.<parameter>.<state>``
with their global shapes: expert weights as ``[E, ...]`` tensors whose dim 0 is the global expert
index, so a checkpoint written at one mesh (world size, expert-parallel size, ``"fsdp"`` or
``"ddp"``) loads at any other, optimizer state included. Before loading, every expert weight of
the model is checked against the metadata: a layer whose expert count differs, an expert row no
chunk covers, an expert stored twice or a shard file that is missing is an error naming the layer
and the experts, raised on every rank before any collective.

Writes are atomic (:class:`~lightning_moe.io.AtomicDirectory`): the shards go to a staging
directory beside the destination, which is swapped into place once complete, so a kill during a
save leaves the previous checkpoint loadable.

:func:`read_full_checkpoint` turns any checkpoint (this format, the legacy expert-sharded
directories, a single file) into one Lightning checkpoint dict with whole tensors, and
:func:`consolidate_checkpoint` writes it as one file (``lightning-moe consolidate``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_moe.io.atomic import AtomicDirectory, atomic_save, recover_directory
from lightning_moe.strategy.legacy_checkpoint import (
    TRAINING_STATE_KEYS,
    CheckpointError,
    is_legacy_checkpoint,
    read_legacy_checkpoint,
)

FORMAT_VERSION = 2
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint
DCP_METADATA_FILE = ".metadata"
FORMAT_KEY = "expert_parallel_checkpoint"  # not "lightning_moe": the modules keep their tokenizer there
MODEL_KEY = "state_dict"


def optimizer_key(index: int) -> str:
    """The top-level DCP key of optimizer ``index``'s state."""
    return f"optimizer_{index}"


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DCP checkpoint directory (holds ``.metadata``)."""
    recover_directory(path)
    return Path(path).is_dir() and (Path(path) / DCP_METADATA_FILE).is_file()


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory: distributed (DCP) or the legacy expert-sharded format."""
    return is_distributed_checkpoint(path) or is_legacy_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# save


def save_distributed_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    metadata: dict[str, Any],
    *,
    is_rank_zero: bool,
    barrier: Callable[[str], None],
) -> None:
    """Write a distributed checkpoint atomically (every rank calls this).

    Args:
        path: the checkpoint directory.
        tensors: ``{"state_dict": model state, "optimizer_0": optimizer state, ...}`` of DTensors
            (``get_model_state_dict`` / ``get_optimizer_state_dict``).
        metadata: the rest of the Lightning checkpoint; rank 0 writes it to ``meta.pt``.
        is_rank_zero: whether this rank prepares and commits the directory.
        barrier: a barrier over every rank (the strategy's).
    """
    import torch.distributed.checkpoint as dcp

    target = AtomicDirectory(path)
    if is_rank_zero:
        target.begin()
    barrier("lightning_moe.checkpoint.begin")
    dcp.save(tensors, checkpoint_id=str(target.staging))
    if is_rank_zero:
        torch.save(metadata, target.staging / META_FILE)
    barrier("lightning_moe.checkpoint.written")
    if is_rank_zero:
        target.commit()
    barrier("lightning_moe.checkpoint.committed")


# --------------------------------------------------------------------------------------------------
# validation


def _read_dcp_metadata(path: str | os.PathLike):  # type: ignore[no-untyped-def]
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable distributed checkpoint ({type(err).__name__}: {err}); pass a checkpoint "
            "directory written by ExpertParallelStrategy"
        ) from err


def check_experts(path: str | os.PathLike, experts: Mapping[str, tuple[str, int]]) -> None:
    """Check that a distributed checkpoint holds every expert of the model exactly once.

    Pure and local (reads the metadata and lists the files): every rank reaches the same verdict.

    Args:
        path: the checkpoint directory.
        experts: ``{parameter key: (MoE layer name, num_experts)}`` of the model's expert weights.

    Raises:
        CheckpointError: naming the layer and experts that are missing, stored twice, or of a
            different count, or a shard file that is missing.
    """
    meta = _read_dcp_metadata(path)
    stored = meta.state_dict_metadata
    files: dict[str, list[Any]] = {}
    for index, info in (meta.storage_data or {}).items():
        files.setdefault(info.relative_path, []).append(index)
    absent_files = sorted(f for f in files if not (Path(path) / f).is_file())
    for key, (layer, num_experts) in experts.items():
        name = f"{MODEL_KEY}.{key}"
        entry = stored.get(name)
        if entry is None or not hasattr(entry, "chunks"):
            raise CheckpointError(
                f"checkpoint {path} has no {key!r}: the experts of MoE layer {layer!r} are missing; load a checkpoint "
                "of this model"
            )
        size = tuple(entry.size)
        if size[0] != num_experts:
            raise CheckpointError(
                f"MoE layer {layer!r} has num_experts={num_experts} but checkpoint {path} holds {size[0]} experts for "
                f"it ({key} has shape {size}); build the model with num_experts={size[0]} to load this checkpoint"
            )
        row_volume = 1
        for extent in size[1:]:
            row_volume *= extent
        covered = [0] * num_experts
        lost: set[int] = set()
        for chunk_index, chunk in enumerate(entry.chunks):
            lo, hi = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            volume = 1
            for extent in chunk.sizes[1:]:
                volume *= extent
            for e in range(lo, hi):
                covered[e] += volume
            storage = _storage_file(meta, name, chunk_index, chunk.offsets)
            if storage in absent_files:
                lost.update(range(lo, hi))
        twice = [e for e in range(num_experts) if covered[e] > row_volume]
        missing = [e for e in range(num_experts) if covered[e] < row_volume]
        if twice:
            raise CheckpointError(
                f"expert {twice[0]} of MoE layer {layer!r} ({key}) is stored twice in checkpoint {path} (experts "
                f"{twice}); the checkpoint is corrupt: re-save it"
            )
        if missing:
            raise CheckpointError(
                f"expert {missing[0]} of MoE layer {layer!r} ({key}) is missing from checkpoint {path} (experts "
                f"{missing}); the checkpoint is incomplete"
            )
        if lost:
            raise CheckpointError(
                f"experts {sorted(lost)} of MoE layer {layer!r} ({key}) are in shard file(s) {absent_files} that are "
                f"missing from checkpoint {path}; copy the whole checkpoint directory"
            )
    if absent_files:
        raise CheckpointError(
            f"shard file(s) {absent_files} of checkpoint {path} are missing; copy the whole checkpoint directory"
        )


def _storage_file(meta: Any, name: str, chunk_index: int, offsets: Any) -> str | None:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = (meta.storage_data or {}).get(MetadataIndex(name, offsets, chunk_index))
    if info is None:
        info = (meta.storage_data or {}).get(MetadataIndex(name, offsets))
    return None if info is None else info.relative_path


# --------------------------------------------------------------------------------------------------
# load


def load_distributed_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    experts: Mapping[str, tuple[str, int]],
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a distributed checkpoint into a sharded model and its optimizers (every rank calls this).

    Args:
        path: the checkpoint directory.
        model: the parallelized LightningModule.
        optimizers: its optimizers (empty outside fitting: weights only).
        experts: the model's expert weights (see :func:`check_experts`).
        strict: every model tensor must be in the checkpoint.

    Returns:
        The non-tensor part (``meta.pt``) for Lightning to restore loops, callbacks and schedulers.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lightning_moe.io.checkpoint_loader import scan_checkpoint_directory

    scan_checkpoint_directory(path)  # no foreign object in .metadata or meta.pt, before DCP unpickles them
    check_experts(path, experts)
    model_state = {MODEL_KEY: get_model_state_dict(model)}
    dcp.load(model_state, checkpoint_id=str(path))
    set_model_state_dict(model, model_state[MODEL_KEY], options=StateDictOptions(strict=strict))
    for index, optimizer in enumerate(optimizers):
        optim_state = {optimizer_key(index): get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=str(path))
        set_optimizer_state_dict(model, optimizer, optim_state[optimizer_key(index)])
    return read_checkpoint_metadata(path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor part of a distributed checkpoint (``meta.pt``)."""
    from lightning_moe.io.checkpoint_loader import torch_load_safe

    file = Path(path) / META_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is an incomplete checkpoint; copy the whole directory")
    return torch_load_safe(file)


def load_full_into_sharded(
    checkpoint: Mapping[str, Any],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    *,
    strict: bool = True,
) -> None:
    """Load a checkpoint with whole tensors (a single file, or a legacy directory read whole) into a sharded model.

    Each rank takes its shards of the full tensors; optimizer state in torch's index format is
    re-keyed by parameter name in the optimizer's parameter order.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, dict(checkpoint["state_dict"]), options=options)
    saved = checkpoint.get("optimizer_states", [])
    names = {id(p): n for n, p in model.named_parameters()}
    for index, optimizer in enumerate(optimizers):
        if index >= len(saved):
            break
        state = saved[index]
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        keyed = {
            "state": {order[i]: v for i, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state.get("param_groups", [])],
        }
        set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------------
# whole checkpoints


def _index_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (DCP) -> torch's format, keyed by index in group order."""
    groups = state.get("param_groups", [])
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    per_param = {index[name]: dict(value) for name, value in state.get("state", {}).items() if name in index}
    return {
        "state": per_param,
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }


def read_full_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Any checkpoint as one Lightning checkpoint dict with whole tensors (no process group needed).

    Args:
        path: a distributed checkpoint directory, a legacy expert-sharded directory, or a file.

    Returns:
        ``{"state_dict": {key: tensor}, "optimizer_states": [...], ...}`` as a single-device
        ``Trainer.save_checkpoint`` writes it.

    Raises:
        CheckpointError: on a missing or duplicated expert, or an unreadable checkpoint.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lightning_moe.io.checkpoint_loader import scan_checkpoint_directory, torch_load_safe

    if Path(path).is_dir():
        scan_checkpoint_directory(path)  # no foreign object in any pickle, before anything is unpickled
    if is_legacy_checkpoint(path):
        return read_legacy_checkpoint(path)
    if not is_distributed_checkpoint(path):
        return torch_load_safe(path)

    checkpoint = read_checkpoint_metadata(path)
    experts = {key: (layer, num) for key, (layer, num) in checkpoint.get(FORMAT_KEY, {}).get("experts", {}).items()}
    check_experts(path, experts)
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        file = Path(tmp) / "whole.pt"
        dcp_to_torch_save(str(path), str(file))
        tensors = torch_load_safe(file)
    checkpoint[MODEL_KEY] = tensors.pop(MODEL_KEY)
    optimizers = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        checkpoint["optimizer_states"] = [_index_optimizer_state(tensors[k]) for k in optimizers]
    return checkpoint


def consolidate_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, weights_only_model: bool = False
) -> dict[str, Any]:
    """Merge a checkpoint directory (distributed or legacy) into one Lightning checkpoint file.

    The file holds every expert once, stacked ``[E, ...]`` under the model's own state-dict keys,
    so ``LightningModule.load_from_checkpoint`` loads it into an unsharded model (inference,
    ``lightning-moe translate``); :class:`~lightning_moe.ExpertParallelStrategy` also resumes from
    it at any layout. Written atomically.

    Args:
        src: a checkpoint directory (a single file is rewritten as is).
        dst: the file to write.
        weights_only_model: drop the training state (optimizer, schedulers, loops, callbacks),
            keeping weights, hyper-parameters and what the module's ``on_save_checkpoint`` added.

    Returns:
        The consolidated checkpoint dict that was written.

    Raises:
        CheckpointError: if an expert is missing or stored twice.
    """
    checkpoint = read_full_checkpoint(src)
    if weights_only_model:
        checkpoint = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE_KEYS}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint, dst)
    return checkpoint


__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "META_FILE",
    "TRAINING_STATE_KEYS",
    "CheckpointError",
    "check_experts",
    "consolidate_checkpoint",
    "is_distributed_checkpoint",
    "is_sharded_checkpoint",
    "load_distributed_checkpoint",
    "load_full_into_sharded",
    "read_checkpoint_metadata",
    "read_full_checkpoint",
    "save_distributed_checkpoint",
]
