"""``load_hf_model``: a :class:`~lightning_moe.models.MoEDecoder` from a local Hugging Face directory.

Every tensor is accounted for before any is read: a tensor the model needs but the files lack, a
tensor the files hold but the model does not use (outside a family's short list of known extras,
such as DeepSeek-V3's multi-token-prediction layer), or a tensor of the wrong shape is an error
that names it. Nothing is ever left randomly initialised.

Under expert parallelism, build the model on the ``meta`` device, shard its experts (the strategy
does this, or ``MoE.shard_experts``), then :func:`load_hf_weights`: each rank reads only the
experts ``[expert_offset, expert_offset + num_local_experts)`` of each MoE layer (whole tensors in
the per-expert layout, a ``get_slice`` of the fused ``[E, ...]`` tensors), so no rank ever holds
every expert.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import Tensor

from lightning_moe.hf.families import adapter_for
from lightning_moe.hf.io import SafetensorsDirectory, read_config
from lightning_moe.models.decoder import MoEDecoder
from lightning_moe.models.decoder_config import DecoderConfig
from lightning_moe.moe.layer import MoE
from lightning_moe.moe.router import Router

_MAX_LISTED = 20


def hf_decoder_config(path: str | os.PathLike, **overrides: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` of the model in directory ``path``.

    Args:
        path: a local Hugging Face model directory.
        **overrides: :class:`DecoderConfig` fields to change, e.g. training options of the MoE layers
            (``capacity_factor=1.25``, ``aux_loss_weight=0.01``, ``moe_backend="triton"``,
            ``bias_update_rate=1e-3``).

    Raises:
        ValueError: for an unsupported family or setting, or an unknown override.
    """
    hf = read_config(path)
    config = adapter_for(hf.get("model_type")).config_from_hf(hf)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DecoderConfig)})
    if unknown:
        raise ValueError(f"unknown DecoderConfig field(s) {unknown}; see lightning_moe.models.DecoderConfig")
    return dataclasses.replace(config, **overrides) if overrides else config


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype ``config.json`` names (``dtype`` or ``torch_dtype``); float32 if it names none."""
    hf = read_config(path)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_hf_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> MoEDecoder:
    """Build the model of a local Hugging Face directory and load its weights (nothing is downloaded).

    Args:
        path: a directory with ``config.json`` and ``*.safetensors`` (one file, or shards with
            ``model.safetensors.index.json``) of a supported family: ``mixtral``, ``qwen3_moe``,
            ``qwen2_moe``, ``olmoe``, ``deepseek_v3``, or dense ``llama`` / ``qwen3``.
        dtype: parameter dtype; ``None`` uses the checkpoint's (``config.json``'s ``dtype``). Router
            correction biases stay float32.
        device: where the parameters live.
        **overrides: :class:`DecoderConfig` fields to change (see :func:`hf_decoder_config`).

    Returns:
        The :class:`~lightning_moe.models.MoEDecoder` in eval mode.

    Raises:
        FileNotFoundError: if the directory lacks ``config.json`` or safetensors files.
        ValueError: for an unsupported family, or a missing, unexpected or mis-shaped tensor (named).

    Example:
        >>> model = load_hf_model("checkpoints/OLMoE-1B-7B-0924")  # doctest: +SKIP
        >>> logits = model(input_ids)  # [B, T, V]  # doctest: +SKIP
    """
    config = hf_decoder_config(path, **overrides)
    with torch.device("meta"):
        model = MoEDecoder(config)
    model.to(dtype or checkpoint_dtype(path))
    load_hf_weights(model, path, device=device)
    return model.eval()


def _local_tensors(
    model: MoEDecoder,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]], dict[str, Tensor]]:
    """Global shapes, each MoE layer's local expert range, and the local tensors to fill, by state-dict key."""
    from torch.distributed.tensor import DTensor

    local: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            local[name] = (module.expert_offset, module.num_local_experts)
    shapes: dict[str, tuple[int, ...]] = {}
    targets: dict[str, Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        prefix, _, rest = key.rpartition(".experts.")
        if isinstance(tensor, DTensor):
            shapes[key] = tuple(tensor.shape)
            targets[key] = tensor.to_local() if prefix in local and "." not in rest else tensor
            continue
        shape = tuple(tensor.shape)
        if prefix in local and "." not in rest:
            module_num_experts = model.get_submodule(prefix).num_experts
            shape = (module_num_experts, *shape[1:])
        shapes[key] = shape
        targets[key] = tensor
    return shapes, local, targets


def _fail(what: str, items: list[str], path: str | os.PathLike, fix: str) -> None:
    listed = ", ".join(items[:_MAX_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")
    raise ValueError(f"{str(path)!r}: {what}: {listed}. {fix}")


@torch.no_grad()
def load_hf_weights(
    model: MoEDecoder,
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    *,
    experts: bool = True,
    non_experts: bool = True,
) -> None:
    """Fill ``model``'s parameters from the safetensors files of ``path``, checking every tensor.

    Parameters still on the ``meta`` device are first allocated on ``device``. Each MoE layer gets
    its local experts ``[expert_offset, expert_offset + num_local_experts)`` only. Every tensor
    name and shape is checked whatever is loaded.

    Args:
        model: a :class:`~lightning_moe.models.MoEDecoder` whose ``config.family`` is the directory's.
        path: the Hugging Face model directory.
        device: where meta parameters are allocated.
        experts: load the routed experts' weights.
        non_experts: load every other tensor. A module loads these before the strategy shards the
            experts, and the experts after it, so that no rank reads every expert.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped tensors; nothing is loaded then.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    config = model.config
    adapter = adapter_for(config.family)
    if any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        model.to_empty(device=device)
    with SafetensorsDirectory(path) as files:
        names = files.names()
        layout = adapter.detect_layout(names, config)
        shapes, local, targets = _local_tensors(model)
        entries = adapter.plan(config, layout, shapes, local)
        expected: dict[str, tuple[int, ...]] = {}
        for entry in entries:
            expected.update(entry.hf)
        tied_copy = config.tie_embeddings and "lm_head.weight" in names
        missing = sorted(set(expected) - names)
        if missing:
            _fail(
                f"{len(missing)} tensor(s) the {config.family} model needs are missing ({layout} expert layout)",
                missing, path, "The checkpoint is incomplete or of another architecture; nothing was loaded",
            )  # fmt: skip
        unexpected = sorted(
            n
            for n in names - set(expected)
            if not adapter.is_ignored(n, config) and not (tied_copy and n == "lm_head.weight")
        )
        if unexpected:
            _fail(
                f"{len(unexpected)} tensor(s) in the files are not used by the {config.family} model ({layout} expert "
                "layout)", unexpected, path,
                "Is config.json the checkpoint's own (layer and expert counts)? Nothing was loaded",
            )  # fmt: skip
        bad = [f"{n} {files.shape(n)} (expected {shape})" for n, shape in expected.items() if files.shape(n) != shape]
        if bad:
            _fail(
                "tensor(s) of the wrong shape", bad, path, "config.json does not match the weights; nothing was loaded"
            )
        if tied_copy and not torch.equal(files.read("lm_head.weight"), files.read("model.embed_tokens.weight")):
            raise ValueError(
                f"{str(path)!r}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight;"
                " set tie_word_embeddings to false in config.json to load both"
            )
        # DTensors that are not local expert slices (e.g. FSDP-sharded): fill a full copy, then distribute.
        full: dict[str, Tensor] = {}
        for key, target in targets.items():
            if isinstance(target, DTensor):
                full[key] = torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
        fill = {**targets, **full}
        for entry in entries:
            if experts if entry.is_expert else non_experts:
                entry.load(files, fill)
        for key, tensor in full.items():
            if not non_experts:
                break
            target = targets[key]
            assert isinstance(target, DTensor)
            target.to_local().copy_(distribute_tensor(tensor, target.device_mesh, target.placements).to_local())
    for module in model.modules():
        if isinstance(module, Router) and module.expert_load is not None:
            module.expert_load.zero_()  # not in the checkpoint: no tokens routed yet


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (``config.json`` with a ``model_type``)."""
    try:
        return "model_type" in read_config(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False


__all__ = ["checkpoint_dtype", "hf_decoder_config", "is_hf_directory", "load_hf_model", "load_hf_weights"]
