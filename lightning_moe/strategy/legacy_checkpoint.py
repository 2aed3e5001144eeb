"""Expert-sharded checkpoints: save per expert-parallel rank, load at any expert-parallel size.

Legend: E experts of a layer, L experts of one rank, P expert-parallel size.

A checkpoint written by :class:`~lightning_moe.ExpertParallelStrategy` is a directory::

    epoch=3-step=400.ckpt/
      common.pt                     rank 0: the Lightning checkpoint without the expert rows
                                    (non-expert weights, optimizer state of non-expert parameters,
                                    loops, callbacks, schedulers, hyper-parameters) and the
                                    ``"expert_parallel"`` metadata below
      experts-00000-of-00002.pt     EP rank 0's experts: weights and optimizer state rows,
      experts-00001-of-00002.pt     keyed by global expert index (written by EDP rank 0 only)

Metadata (``common["expert_parallel"]``)::

    {"format_version": 1, "expert_parallel_size": P, "shards": [file names],
     "layers": {layer: {"num_experts": E, "params": [state-dict keys of w1, w2, w3]}},
     "optimizer_params": [{optimizer state index: state-dict key} for each optimizer]}

A shard file::

    {"shard": p, "num_shards": P,
     "experts": {key: {global expert: tensor}},                     # rows of w1/w2/w3
     "optimizer": [{key: {state name: {global expert: tensor}}}]}   # e.g. exp_avg, exp_avg_sq

Optimizer state entries shaped like the parameter (``exp_avg``, ``exp_avg_sq``) are split into rows;
the rest (``step``) is the same on every rank and stays in ``common.pt``.

Every expert is stored exactly once. Loading checks that every expert of every layer is present in
exactly one shard and that the expert counts match the model, and re-slices the rows for the
loading rank, so a checkpoint written at one P loads at any other. :func:`consolidate_checkpoint`
(``python -m lightning_moe.strategy.consolidate SRC DST``) turns the directory into one ordinary
Lightning checkpoint file (full ``[E, ...]`` expert tensors),
which ``LightningModule.load_from_checkpoint`` and ``lightning-moe translate`` read, and which
the strategy also resumes from at any P.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import Tensor, nn

from lightning_moe.moe.layer import moe_layers
from lightning_moe.strategy.grads import EXPERT_WEIGHT_NAMES

FORMAT_VERSION = 1
COMMON_FILE = "common.pt"
METADATA_KEY = "expert_parallel"
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: a missing or duplicated expert, a wrong expert count."""


@dataclass(frozen=True)
class ExpertLayerSpec:
    """What a checkpoint needs to know about one MoE layer of the model.

    Attributes:
        name: qualified name of the layer in the LightningModule.
        num_experts: E.
        param_keys: state-dict keys of the stacked expert weights (``<name>.experts.w1``, ...).
        offset: first global expert held by this rank.
        num_local: L, experts held by this rank.
    """

    name: str
    num_experts: int
    param_keys: tuple[str, ...]
    offset: int
    num_local: int


def expert_layer_specs(module: nn.Module) -> list[ExpertLayerSpec]:
    """The :class:`ExpertLayerSpec` of every MoE layer of ``module`` as it is now (sharded or not)."""
    specs = []
    for name, layer in moe_layers(module):
        prefix = f"{name}.experts." if name else "experts."
        keys = tuple(prefix + w for w in EXPERT_WEIGHT_NAMES if getattr(layer.experts, w, None) is not None)
        specs.append(ExpertLayerSpec(name, layer.num_experts, keys, layer.expert_offset, layer.num_local_experts))
    return specs


def optimizer_expert_params(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[int, str]:
    """``{state-dict index: parameter key}`` of the expert parameters an optimizer holds.

    Indices are those of ``optimizer.state_dict()["state"]``: parameters numbered across
    ``param_groups`` in order. They are the same at every expert-parallel size, because sharding
    replaces each expert weight in place.
    """
    key_by_id = {}
    for spec in expert_layer_specs(module):
        for key in spec.param_keys:
            key_by_id[id(module.get_parameter(key))] = key
    out = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) in key_by_id:
                out[index] = key_by_id[id(param)]
            index += 1
    return out


# --------------------------------------------------------------------------------------------------
# save


def split_checkpoint(
    checkpoint: Mapping[str, Any],
    specs: Sequence[ExpertLayerSpec],
    optimizer_params: Sequence[Mapping[int, str]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a rank's Lightning checkpoint into the common part and this rank's expert shard.

    Nothing in ``checkpoint`` is modified (its optimizer state dicts are the optimizer's own).

    Args:
        checkpoint: what ``Trainer`` dumped on this rank (local expert weights ``[L, ...]``).
        specs: the model's MoE layers as sharded now.
        optimizer_params: :func:`optimizer_expert_params` of each optimizer.

    Returns:
        ``(common, shard)``; ``common`` lacks the expert rows, ``shard`` holds them by global index.
    """
    spec_by_key = {key: spec for spec in specs for key in spec.param_keys}
    common = dict(checkpoint)
    shard: dict[str, Any] = {"experts": {}, "optimizer": []}
    if "state_dict" in checkpoint:
        state_dict = dict(checkpoint["state_dict"])
        for key, spec in spec_by_key.items():
            if key in state_dict:
                shard["experts"][key] = _rows(state_dict.pop(key), spec, key)
        common["state_dict"] = state_dict
    if "optimizer_states" in checkpoint:
        states = []
        for opt_state, expert_keys in zip(checkpoint["optimizer_states"], optimizer_params, strict=True):
            opt_state = dict(opt_state)
            per_param = dict(opt_state.get("state", {}))
            opt_shard: dict[str, dict[str, dict[int, Tensor]]] = {}
            for index, key in expert_keys.items():
                if index not in per_param:
                    continue
                spec = spec_by_key[key]
                kept, rows = {}, {}
                for name, value in per_param[index].items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == spec.num_local:
                        rows[name] = _rows(value, spec, f"optimizer state {name!r} of {key}")
                    else:
                        kept[name] = value
                per_param[index] = kept
                opt_shard[key] = rows
            opt_state["state"] = per_param
            states.append(opt_state)
            shard["optimizer"].append(opt_shard)
        common["optimizer_states"] = states
    common[METADATA_KEY] = {
        "format_version": FORMAT_VERSION,
        "layers": {s.name: {"num_experts": s.num_experts, "params": list(s.param_keys)} for s in specs},
        "optimizer_params": [dict(m) for m in optimizer_params],
    }
    return common, shard


def _rows(tensor: Tensor, spec: ExpertLayerSpec, what: str) -> dict[int, Tensor]:
    if tensor.shape[0] != spec.num_local:
        raise CheckpointError(
            f"{what} has {tensor.shape[0]} rows but MoE layer {spec.name!r} holds {spec.num_local} experts on this "
            "rank; the model was changed after sharding"
        )
    # Views of one storage: torch.save writes the storage once.
    return {spec.offset + i: tensor[i] for i in range(spec.num_local)}


def shard_file_name(index: int, count: int) -> str:
    """File name of expert shard ``index`` of ``count``."""
    return f"experts-{index:05d}-of-{count:05d}.pt"


def write_sharded_checkpoint(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike,
    specs: Sequence[ExpertLayerSpec],
    optimizer_params: Sequence[Mapping[int, str]],
    *,
    write_common: bool,
    shard: tuple[int, int] | None,
    checkpoint_io: CheckpointIO | None = None,
    storage_options: Any | None = None,
) -> None:
    """Write this rank's part of a sharded checkpoint directory (see the module docstring).

    Args:
        checkpoint: this rank's Lightning checkpoint.
        path: the checkpoint directory.
        specs: the model's MoE layers as sharded now.
        optimizer_params: :func:`optimizer_expert_params` of each optimizer.
        write_common: this rank writes ``common.pt`` (global rank 0).
        shard: ``(index, count)`` of the expert shard this rank writes, ``None`` if it writes none
            (a replica of another rank's experts).
        checkpoint_io: the plugin that writes files (default: torch.save, atomically).
        storage_options: passed to ``checkpoint_io.save_checkpoint``.
    """
    io = checkpoint_io or TorchCheckpointIO()
    common, expert_rows = split_checkpoint(checkpoint, specs, optimizer_params)
    num_shards = shard[1] if shard is not None else _num_shards(specs)
    if write_common:
        common[METADATA_KEY]["expert_parallel_size"] = num_shards
        common[METADATA_KEY]["shards"] = [shard_file_name(i, num_shards) for i in range(num_shards)]
        io.save_checkpoint(common, os.path.join(path, COMMON_FILE), storage_options=storage_options)
    if shard is not None:
        expert_rows.update(shard=shard[0], num_shards=shard[1])
        io.save_checkpoint(expert_rows, os.path.join(path, shard_file_name(*shard)), storage_options=storage_options)


def _num_shards(specs: Sequence[ExpertLayerSpec]) -> int:
    return specs[0].num_experts // specs[0].num_local if specs else 1


# --------------------------------------------------------------------------------------------------
# load


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (holds ``common.pt``)."""
    fs = get_filesystem(path)
    return fs.isdir(str(path)) and fs.exists(os.path.join(path, COMMON_FILE))


def load_checkpoint(
    path: str | os.PathLike,
    specs: Sequence[ExpertLayerSpec] | None = None,
    optimizer_params: Sequence[Mapping[int, str]] | None = None,
    *,
    checkpoint_io: CheckpointIO | None = None,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Read a sharded directory or a single-file checkpoint as one Lightning checkpoint dict.

    Expert weights and their optimizer state come back stacked, ``[num rows, ...]``: the rows this
    rank holds according to ``specs``, or all ``E`` rows when ``specs`` is None (consolidation).

    Args:
        path: a checkpoint directory written by the strategy, or a single file (consolidated, or an
            ordinary Lightning checkpoint of the same model).
        specs: the loading model's MoE layers as sharded now; ``None`` to read every expert of the
            layers the checkpoint records.
        optimizer_params: the loading optimizers' :func:`optimizer_expert_params`; used for
            single-file checkpoints without metadata.
        checkpoint_io: the plugin that reads files.
        weights_only: passed to ``torch.load`` for ``common.pt`` and single files.

    Returns:
        The checkpoint, with expert rows re-sliced for this rank.

    Raises:
        CheckpointError: if an expert is missing or stored twice, or an expert count or layer does
            not match the model; the message names the expert and the layer.
        FileNotFoundError: if ``path`` does not exist.
    """
    io = checkpoint_io or TorchCheckpointIO()
    if is_sharded_checkpoint(path):
        return _load_sharded(path, specs, io, weights_only)
    checkpoint = io.load_checkpoint(path, weights_only=weights_only)
    return _slice_single_file(checkpoint, path, specs, optimizer_params)


def _wanted(
    specs: Sequence[ExpertLayerSpec] | None, layers: Mapping[str, Mapping[str, Any]], path: Any
) -> dict[str, tuple[int, int, int]]:
    """``{layer: (num_experts, start, stop)}`` to read, after checking the model against the checkpoint."""
    if specs is None:
        return {name: (info["num_experts"], 0, info["num_experts"]) for name, info in layers.items()}
    wanted = {}
    for spec in specs:
        if spec.name not in layers:
            raise CheckpointError(
                f"MoE layer {spec.name!r} of the model has no experts in checkpoint {path} (it holds layers "
                f"{sorted(layers)}); load a checkpoint of this model"
            )
        saved = layers[spec.name]["num_experts"]
        if saved != spec.num_experts:
            raise CheckpointError(
                f"MoE layer {spec.name!r} has num_experts={spec.num_experts} but checkpoint {path} holds {saved} "
                f"experts for it; build the model with num_experts={saved} to load this checkpoint"
            )
        wanted[spec.name] = (spec.num_experts, spec.offset, spec.offset + spec.num_local)
    extra = sorted(set(layers) - {s.name for s in specs})
    if extra:
        raise CheckpointError(
            f"checkpoint {path} holds experts of MoE layers {extra} that the model does not have; load a "
            "checkpoint of this model"
        )
    return wanted


def _load_sharded(
    path: str | os.PathLike, specs: Sequence[ExpertLayerSpec] | None, io: CheckpointIO, weights_only: bool | None
) -> dict[str, Any]:
    common = io.load_checkpoint(os.path.join(path, COMMON_FILE), weights_only=weights_only)
    meta = common.get(METADATA_KEY)
    if not meta or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{os.path.join(path, COMMON_FILE)} has no expert-parallel metadata of format version {FORMAT_VERSION}; "
            "it was not written by ExpertParallelStrategy"
        )
    layers = meta["layers"]
    wanted = _wanted(specs, layers, path)
    layer_of_key = {key: name for name, info in layers.items() for key in info["params"]}
    # rows[key][e] = tensor; optimizer_rows[k][key][state name][e] = tensor; where[key][e] = shard file
    rows: dict[str, dict[int, Tensor]] = {key: {} for key in layer_of_key}
    where: dict[str, dict[int, str]] = {key: {} for key in layer_of_key}
    num_opt = len(meta["optimizer_params"])
    optimizer_rows: list[dict[str, dict[str, dict[int, Tensor]]]] = [{} for _ in range(num_opt)]
    for file_name in meta["shards"]:
        shard_path = os.path.join(path, file_name)
        if not get_filesystem(shard_path).exists(shard_path):
            raise CheckpointError(
                f"expert shard {file_name} listed in {os.path.join(path, COMMON_FILE)} is missing; experts it held "
                "cannot be restored: copy the whole checkpoint directory"
            )
        shard = io.load_checkpoint(shard_path, weights_only=True)
        for key, by_expert in shard["experts"].items():
            if key not in layer_of_key:
                raise CheckpointError(f"shard {file_name} holds {key!r}, which belongs to no MoE layer in {path}")
            _, start, stop = wanted.get(layer_of_key[key], (0, 0, 0))
            for e, tensor in by_expert.items():
                if e in where[key]:
                    raise CheckpointError(
                        f"expert {e} of MoE layer {layer_of_key[key]!r} ({key}) is stored twice in checkpoint {path}: "
                        f"in {where[key][e]} and {file_name}; remove the stale shard or re-save the checkpoint"
                    )
                if not 0 <= e < layers[layer_of_key[key]]["num_experts"]:
                    raise CheckpointError(
                        f"expert {e} of MoE layer {layer_of_key[key]!r} ({key}) in {file_name} is outside "
                        f"[0, {layers[layer_of_key[key]]['num_experts']}); the checkpoint is corrupt"
                    )
                where[key][e] = file_name
                if start <= e < stop:
                    rows[key][e] = tensor.clone()
        for k, per_key in enumerate(shard.get("optimizer", [])[:num_opt]):
            for key, per_state in per_key.items():
                _, start, stop = wanted.get(layer_of_key[key], (0, 0, 0))
                for state_name, by_expert in per_state.items():
                    dst = optimizer_rows[k].setdefault(key, {}).setdefault(state_name, {})
                    for e, tensor in by_expert.items():
                        if start <= e < stop:
                            dst[e] = tensor.clone()
        del shard
    for key, layer in layer_of_key.items():
        missing = [e for e in range(layers[layer]["num_experts"]) if e not in where[key]]
        if missing:
            raise CheckpointError(
                f"expert {missing[0]} of MoE layer {layer!r} ({key}) is missing from checkpoint {path} "
                f"(missing experts: {missing}); the checkpoint is incomplete: copy every shard file"
            )
    state_dict = dict(common.get("state_dict", {}))
    for key, layer in layer_of_key.items():
        if layer in wanted:
            _, start, stop = wanted[layer]
            state_dict[key] = torch.stack([rows[key][e] for e in range(start, stop)])
    common["state_dict"] = state_dict
    if "optimizer_states" in common:
        states = []
        for k, opt_state in enumerate(common["optimizer_states"]):
            opt_state = dict(opt_state)
            per_param = dict(opt_state.get("state", {}))
            for index, key in meta["optimizer_params"][k].items():
                layer = layer_of_key[key]
                if index not in per_param or layer not in wanted:
                    continue
                _, start, stop = wanted[layer]
                entry = dict(per_param[index])
                for state_name, by_expert in optimizer_rows[k].get(key, {}).items():
                    absent = [e for e in range(start, stop) if e not in by_expert]
                    if absent:
                        raise CheckpointError(
                            f"optimizer state {state_name!r} of expert {absent[0]} of MoE layer {layer!r} ({key}) is "
                            f"missing from checkpoint {path}; the checkpoint is incomplete: copy every shard file"
                        )
                    entry[state_name] = torch.stack([by_expert[e] for e in range(start, stop)])
                per_param[index] = entry
            opt_state["state"] = per_param
            states.append(opt_state)
        common["optimizer_states"] = states
    meta = dict(meta)
    meta.pop("shards", None)
    meta["expert_parallel_size"] = 1
    common[METADATA_KEY] = meta
    return common


def _slice_single_file(
    checkpoint: dict[str, Any],
    path: Any,
    specs: Sequence[ExpertLayerSpec] | None,
    optimizer_params: Sequence[Mapping[int, str]] | None,
) -> dict[str, Any]:
    """Keep this rank's rows of the full ``[E, ...]`` expert tensors of a single-file checkpoint."""
    if specs is None:
        return checkpoint
    state_dict = dict(checkpoint.get("state_dict", {}))
    meta = checkpoint.get(METADATA_KEY)
    if meta is not None:
        _wanted(specs, meta["layers"], path)
    spec_by_key = {}
    for spec in specs:
        for key in spec.param_keys:
            if key not in state_dict:
                raise CheckpointError(
                    f"checkpoint {path} has no {key!r}: the experts of MoE layer {spec.name!r} are missing; load a "
                    "checkpoint of this model"
                )
            saved = state_dict[key].shape[0]
            if saved != spec.num_experts:
                raise CheckpointError(
                    f"MoE layer {spec.name!r} has num_experts={spec.num_experts} but checkpoint {path} holds {saved} "
                    f"experts for it ({key} has shape {tuple(state_dict[key].shape)}); build the model with "
                    f"num_experts={saved} to load this checkpoint"
                )
            state_dict[key] = state_dict[key][spec.offset : spec.offset + spec.num_local].clone()
            spec_by_key[key] = spec
    checkpoint = dict(checkpoint)
    checkpoint["state_dict"] = state_dict
    maps = meta["optimizer_params"] if meta is not None else optimizer_params
    if "optimizer_states" in checkpoint and maps is not None:
        states = []
        for opt_state, expert_keys in zip(checkpoint["optimizer_states"], maps, strict=False):
            opt_state = dict(opt_state)
            per_param = dict(opt_state.get("state", {}))
            for index, key in expert_keys.items():
                if index not in per_param or key not in spec_by_key:
                    continue
                spec = spec_by_key[key]
                entry = dict(per_param[index])
                for name, value in entry.items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == spec.num_experts:
                        entry[name] = value[spec.offset : spec.offset + spec.num_local].clone()
                per_param[index] = entry
            opt_state["state"] = per_param
            states.append(opt_state)
        checkpoint["optimizer_states"] = states
    return checkpoint


# --------------------------------------------------------------------------------------------------
# consolidate


def consolidate_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, weights_only_model: bool = False
) -> dict[str, Any]:
    """Merge a sharded checkpoint directory into one Lightning checkpoint file.

    The file holds every expert once, stacked ``[E, ...]`` under the model's own state-dict keys,
    so ``LightningModule.load_from_checkpoint`` loads it into an unsharded model (inference,
    ``lightning-moe translate``); :class:`~lightning_moe.ExpertParallelStrategy` also resumes
    from it at any expert-parallel size.

    Args:
        src: a checkpoint directory written by the strategy (a single file is copied as is).
        dst: the file to write.
        weights_only_model: drop the training state (:data:`TRAINING_STATE_KEYS`: optimizer,
            schedulers, loops, callbacks), keeping weights, hyper-parameters and whatever the
            module's ``on_save_checkpoint`` added (a smaller file for inference).

    Returns:
        The consolidated checkpoint dict that was written.

    Raises:
        CheckpointError: if an expert is missing or stored twice.

    Example::

        python -m lightning_moe.strategy.consolidate runs/last.ckpt model.ckpt
    """
    checkpoint = load_checkpoint(src, weights_only=False)
    if weights_only_model:
        checkpoint = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE_KEYS}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    TorchCheckpointIO().save_checkpoint(checkpoint, dst)
    return checkpoint


__all__ = [
    "COMMON_FILE",
    "FORMAT_VERSION",
    "TRAINING_STATE_KEYS",
    "CheckpointError",
    "ExpertLayerSpec",
    "consolidate_checkpoint",
    "expert_layer_specs",
    "is_sharded_checkpoint",
    "load_checkpoint",
    "optimizer_expert_params",
    "shard_file_name",
    "split_checkpoint",
    "write_sharded_checkpoint",
]
