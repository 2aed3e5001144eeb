"""Reading, editing and writing the checkpoints that model surgery works on.

Legend: E experts of a layer.

Surgery works on checkpoint dicts, not on built modules: every MoE layer of a Lightning checkpoint is
found by its ``<layer>.router.weight`` key (``[E, H]``) and its stacked ``<layer>.experts.w1/w2/w3``
tensors (``[E, ...]``), so pruning and aggregation work for every module whose MoE layers are
:class:`~lightning_moe.moe.MoE` layers, whatever the model around them.

A checkpoint that surgery writes is a *model checkpoint*: weights, hyper-parameters (with the new
expert count), the tokenizer and datamodule state, and no training state (no optimizer moments, no
schedulers, loops or callback state). ``load_from_checkpoint``, ``lightning-moe translate`` and
``lightning-moe validate/test --ckpt_path`` read it; ``lightning-moe fit --ckpt_path`` starts a new
run from its weights at step 0 with a fresh optimizer and schedule.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_moe.io import atomic_save
from lightning_moe.moe.layer import MoE

#: Checkpoint entries surgery never carries: training state and the sharded-checkpoint metadata.
DROPPED_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "expert_parallel")
#: Stacked per-expert weights of an MoE layer, ``[E, ...]`` each (``w3`` only for SwiGLU).
EXPERT_KEYS = ("experts.w1", "experts.w2", "experts.w3")
#: Key of the provenance record surgery adds to the checkpoints it writes.
SURGERY_KEY = "lightning_moe_surgery"


class SurgeryError(ValueError):
    """A checkpoint cannot be pruned or aggregated as asked; the message names the value and the fix."""


def load_checkpoint_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint as one dict: a ``.ckpt`` file, or an expert-sharded directory (consolidated).

    Reads through :func:`lightning_moe.io.load_checkpoint`: weights-only with the project's allowlist (a
    checkpoint from an untrusted source cannot run code) and a one-line error for a missing, empty,
    truncated or foreign file.

    Args:
        path: the checkpoint file or the directory written by
            :class:`~lightning_moe.ExpertParallelStrategy`.

    Returns:
        The checkpoint dict, every expert stacked ``[E, ...]`` under the model's own keys.

    Raises:
        CheckpointLoadError: if ``path`` is missing, unreadable, holds no model weights or non-finite ones
            (a ``ValueError``, like :class:`SurgeryError`).
    """
    from lightning_moe.io.checkpoint_loader import load_checkpoint

    return load_checkpoint(path)


def save_checkpoint_dict(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically (:func:`lightning_moe.io.atomic_save`)."""
    atomic_save(dict(checkpoint), path)


def moe_layer_names(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Qualified names of the MoE layers in a state dict (``"model.encoder.1.ffn"``, ...), in key order.

    A layer is a prefix ``p`` with ``p.router.weight`` and ``p.experts.w1`` keys.
    """
    suffix = ".router.weight"
    names = [key[: -len(suffix)] for key in state_dict if key.endswith(suffix)]
    return [name for name in names if f"{name}.experts.w1" in state_dict]


def layer_num_experts(state_dict: Mapping[str, Tensor], layer: str) -> int:
    """``E`` of MoE layer ``layer`` (the rows of its router weight)."""
    return int(state_dict[f"{layer}.router.weight"].shape[0])


def expert_tensor_keys(state_dict: Mapping[str, Tensor], layer: str) -> list[str]:
    """The state-dict keys of ``layer`` with one row per expert: router weight and stacked expert weights."""
    keys = [f"{layer}.router.weight"]
    keys += [f"{layer}.{name}" for name in EXPERT_KEYS if f"{layer}.{name}" in state_dict]
    return keys


def num_experts_of(hparams: Mapping[str, Any]) -> int | None:
    """The ``num_experts`` hyper-parameter (flat, or inside a ``config`` dataclass or dict), or None."""
    config = hparams.get("config")
    if config is not None:
        value = config.get("num_experts") if isinstance(config, Mapping) else getattr(config, "num_experts", None)
        if value is not None:
            return int(value)
    value = hparams.get("num_experts")
    return None if value is None else int(value)


def with_num_experts(hparams: Mapping[str, Any], num_experts: int) -> dict[str, Any]:
    """A copy of ``hparams`` with ``num_experts`` replaced, flat or inside ``config``.

    Raises:
        SurgeryError: if the hyper-parameters hold no ``num_experts``.
    """
    out = dict(hparams)
    config = out.get("config")
    if config is not None and dataclasses.is_dataclass(config) and not isinstance(config, type):
        out["config"] = dataclasses.replace(config, num_experts=num_experts)
        return out
    if isinstance(config, Mapping) and "num_experts" in config:
        out["config"] = {**config, "num_experts": num_experts}
        return out
    if "num_experts" not in out:
        raise SurgeryError(
            "the checkpoint's hyper_parameters hold no num_experts; surgery needs a checkpoint of a lightning_moe "
            "module (MultitaskTranslationModule or LanguageModelModule)"
        )
    out["num_experts"] = num_experts
    return out


def top_k_of(hparams: Mapping[str, Any]) -> int:
    """The ``top_k`` hyper-parameter (flat or inside ``config``); 1 when absent."""
    config = hparams.get("config")
    if config is not None:
        value = config.get("top_k") if isinstance(config, Mapping) else getattr(config, "top_k", None)
        if value is not None:
            return int(value)
    return int(hparams.get("top_k", 1))


def model_checkpoint(
    checkpoint: Mapping[str, Any], state_dict: dict[str, Tensor], hparams: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    """A model checkpoint from ``checkpoint``'s other entries, with new weights, hyper-parameters and provenance."""
    out = {k: v for k, v in checkpoint.items() if k not in DROPPED_KEYS}
    out["state_dict"] = state_dict
    out["hyper_parameters"] = hparams
    # Empty training state: `fit --ckpt_path` then starts at step 0 with a fresh optimizer and schedule.
    out.update({"epoch": 0, "global_step": 0, "optimizer_states": [], "lr_schedulers": []})
    out[SURGERY_KEY] = [*checkpoint.get(SURGERY_KEY, []), record]
    return out


def set_dropless(module: torch.nn.Module) -> dict[MoE, tuple[float | None, float | None]]:
    """Make every MoE layer of ``module`` dropless; returns the previous capacity factors for :func:`restore`."""
    saved = {}
    for layer in module.modules():
        if isinstance(layer, MoE):
            router = layer.router
            saved[layer] = (router.capacity_factor, router.eval_capacity_factor)
            router.capacity_factor = None
            router.eval_capacity_factor = None
    return saved


def restore_capacity(saved: Mapping[MoE, tuple[float | None, float | None]]) -> None:
    """Undo :func:`set_dropless`."""
    for layer, (train, evaluation) in saved.items():
        layer.router.capacity_factor, layer.router.eval_capacity_factor = train, evaluation


__all__ = [
    "DROPPED_KEYS",
    "EXPERT_KEYS",
    "SURGERY_KEY",
    "SurgeryError",
    "expert_tensor_keys",
    "layer_num_experts",
    "load_checkpoint_dict",
    "model_checkpoint",
    "moe_layer_names",
    "num_experts_of",
    "restore_capacity",
    "save_checkpoint_dict",
    "set_dropless",
    "top_k_of",
    "with_num_experts",
]
