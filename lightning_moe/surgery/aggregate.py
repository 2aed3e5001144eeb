"""Expert aggregation (Kim et al. 2021): the union of the experts of separately trained MoE checkpoints.

Legend: E_i experts per layer of checkpoint i.

From checkpoints of one architecture: the shared (non-expert) weights are averaged, the gate
(router) rows are concatenated and the experts are united, so every MoE layer of the result has
``sum_i E_i`` experts, checkpoint 0's first. The result is an initialisation: it carries no
optimizer state, and training continues from it (``lightning-moe fit --ckpt_path OUT.ckpt`` with
``num_experts`` set to the new count, or ``load_from_checkpoint`` then ``Trainer.fit``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_moe.surgery.checkpoints import (
    SurgeryError,
    expert_tensor_keys,
    layer_num_experts,
    load_checkpoint_dict,
    model_checkpoint,
    moe_layer_names,
    num_experts_of,
    save_checkpoint_dict,
    with_num_experts,
)

__all__ = ["ARCHITECTURE_FIELDS", "aggregate_checkpoints", "aggregate_experts"]

#: Hyper-parameters that define the architecture (flat or in ``config``); checkpoints must agree on them.
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers", "n_layers",
    "max_positions", "positions", "activation", "moe_every", "moe_encoder_layers", "moe_decoder_layers",
    "moe_layers", "top_k", "expert_ffn_size", "num_shared_experts",
)  # fmt: skip


def _hparam(hparams: Mapping[str, Any], name: str) -> Any:
    config = hparams.get("config")
    if isinstance(config, Mapping) and name in config:
        return config[name]
    if config is not None and hasattr(config, name):
        return getattr(config, name)
    return hparams.get(name)


def _check_same_architecture(checkpoints: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """Raise unless every checkpoint has checkpoint 0's architecture; returns the MoE layer names."""
    first = checkpoints[0]
    sd0, hp0 = first["state_dict"], first.get("hyper_parameters", {})
    layers = moe_layer_names(sd0)
    if not layers:
        raise SurgeryError(f"{names[0]} has no MoE layer; aggregation unites experts, so pass MoE checkpoints")
    expert_keys0 = {key for layer in layers for key in expert_tensor_keys(sd0, layer)}
    tokenizer0 = first.get("lightning_moe", {}).get("tokenizer")
    for ckpt, name in zip(checkpoints[1:], names[1:], strict=True):
        sd, hp = ckpt["state_dict"], ckpt.get("hyper_parameters", {})
        for field in ARCHITECTURE_FIELDS:
            a, b = _hparam(hp0, field), _hparam(hp, field)
            if a != b:
                raise SurgeryError(
                    f"{name} has {field}={b!r} but {names[0]} has {field}={a!r}; aggregation needs checkpoints of "
                    "one architecture (same model settings except num_experts)"
                )
        if set(sd) != set(sd0):
            only0, only1 = sorted(set(sd0) - set(sd))[:3], sorted(set(sd) - set(sd0))[:3]
            raise SurgeryError(
                f"{name} and {names[0]} have different parameters (only in {names[0]}: {only0}, only in {name}: "
                f"{only1}); aggregate checkpoints of one architecture"
            )
        for key, tensor in sd0.items():
            other = sd[key]
            same = other.shape[1:] == tensor.shape[1:] if key in expert_keys0 else other.shape == tensor.shape
            if not same or other.dtype != tensor.dtype:
                raise SurgeryError(
                    f"{key} is {tuple(other.shape)} {other.dtype} in {name} but {tuple(tensor.shape)} {tensor.dtype} "
                    f"in {names[0]}; aggregate checkpoints of one architecture"
                )
        if ckpt.get("lightning_moe", {}).get("tokenizer") != tokenizer0:
            raise SurgeryError(
                f"{name} and {names[0]} were trained with different tokenizers, so their embeddings cannot be "
                "averaged; aggregate checkpoints trained on one tokenizer (the datamodule's tokenizer_path)"
            )
    return layers


def aggregate_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Aggregate checkpoint dicts: average non-expert weights, concatenate gate rows, unite experts.

    Args:
        checkpoints: two or more Lightning checkpoint dicts of one architecture and one tokenizer.
        names: how errors name the checkpoints (their paths); default ``checkpoint 0``, ...

    Returns:
        A model checkpoint with ``num_experts = sum of E_i`` (no optimizer or loop state), whose other
        entries (tokenizer, datamodule state, hyper-parameters but ``num_experts``) are checkpoint 0's.

    Raises:
        SurgeryError: with fewer than two checkpoints, or if they differ in architecture or tokenizer,
            naming the difference.
    """
    if len(checkpoints) < 2:
        raise SurgeryError(
            f"aggregation needs at least two checkpoints, got {len(checkpoints)}; pass --ckpt A.ckpt --ckpt B.ckpt"
        )
    names = [f"checkpoint {i}" for i in range(len(checkpoints))] if names is None else list(names)
    layers = _check_same_architecture(checkpoints, names)
    state_dicts = [c["state_dict"] for c in checkpoints]
    counts = [layer_num_experts(sd, layers[0]) for sd in state_dicts]
    for sd, name in zip(state_dicts, names, strict=True):
        per_layer = {layer_num_experts(sd, layer) for layer in layers}
        if len(per_layer) != 1:
            raise SurgeryError(f"{name} has MoE layers with different expert counts {sorted(per_layer)}")
    expert_keys = {key for layer in layers for key in expert_tensor_keys(state_dicts[0], layer)}
    merged: dict[str, Tensor] = {}
    for key, tensor in state_dicts[0].items():
        parts = [sd[key] for sd in state_dicts]
        if key in expert_keys:
            merged[key] = torch.cat(parts, dim=0)  # router rows and experts: checkpoint 0's first
        elif tensor.is_floating_point():
            merged[key] = torch.stack([p.double() for p in parts]).mean(0).to(tensor.dtype)
        else:
            if any(not torch.equal(p, tensor) for p in parts[1:]):
                raise SurgeryError(
                    f"{key} is an integer tensor that differs between the checkpoints; it cannot be averaged"
                )
            merged[key] = tensor.clone()
    total = sum(counts)
    hparams = dict(checkpoints[0].get("hyper_parameters", {}))
    record = {
        "operation": "aggregate",
        "num_experts_before": [num_experts_of(c.get("hyper_parameters", {})) for c in checkpoints],
        "num_experts_after": total,
        "sources": list(names),
    }
    return model_checkpoint(checkpoints[0], merged, with_num_experts(hparams, total), record)


def aggregate_experts(ckpts: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Aggregate checkpoint files (or sharded directories) and optionally write the result.

    Args:
        ckpts: two or more checkpoints of one architecture.
        out: where to write the aggregated checkpoint; ``None`` writes nothing.

    Returns:
        The aggregated checkpoint dict (see :func:`aggregate_checkpoints`).
    """
    names = [str(c) for c in ckpts]
    if len(names) < 2:
        raise SurgeryError(
            f"aggregation needs at least two checkpoints, got {len(names)}; pass --ckpt A.ckpt --ckpt B.ckpt"
        )
    checkpoint = aggregate_checkpoints([load_checkpoint_dict(c) for c in ckpts], names)
    if out is not None:
        save_checkpoint_dict(checkpoint, out)
    return checkpoint
