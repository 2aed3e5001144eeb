"""The legacy expert-sharded checkpoint format (before torch.distributed.checkpoint): read only.

Legend: E experts of a layer, L experts of one rank, P expert-parallel size.

:class:`~lightning_moe.ExpertParallelStrategy` now writes distributed checkpoints
(:mod:`lightning_moe.strategy.checkpoint`); directories in this older format still load (the
strategy resumes from them, ``lightning-moe consolidate`` and every command read them) through
:func:`read_legacy_checkpoint`. A checkpoint written by the strategy before 2026-12-08 is a directory::

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
(``lightning-moe consolidate SRC DST``) turns the directory into one ordinary
Lightning checkpoint file (full ``[E, ...]`` expert tensors),
which ``LightningModule.load_from_checkpoint`` and ``lightning-moe translate`` read, and which
the strategy also resumes from at any P.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import Tensor

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


# --------------------------------------------------------------------------------------------------
# load


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a legacy expert-sharded checkpoint directory (holds ``common.pt``)."""
    fs = get_filesystem(path)
    return fs.isdir(str(path)) and fs.exists(os.path.join(path, COMMON_FILE))


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


def read_legacy_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A legacy expert-sharded directory as one Lightning checkpoint dict (every expert, stacked ``[E, ...]``).

    Raises:
        CheckpointError: if an expert is missing or stored twice.
    """
    return _load_sharded(path, None, _SafeIO(), weights_only=True)


class _SafeIO(TorchCheckpointIO):
    """Reads with :func:`lightning_moe.io.checkpoint_loader.torch_load_safe` (the project's allowlist)."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        from lightning_moe.io.checkpoint_loader import torch_load_safe

        return torch_load_safe(path)


__all__ = ["COMMON_FILE", "CheckpointError", "is_legacy_checkpoint", "read_legacy_checkpoint"]
