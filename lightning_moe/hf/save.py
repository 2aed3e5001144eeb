"""``save_hf_model``: write a :class:`~lightning_moe.models.MoEDecoder` as a Hugging Face directory that transformers loads.

The experts are written in the per-expert layout by default (``experts.{e}.gate_proj.weight``, ...),
which every transformers version and most inference engines read; ``layout="fused"`` writes
transformers 5's ``gate_up_proj`` / ``down_proj`` tensors instead.

Under expert parallelism each rank of the first expert-parallel group writes its own experts to
its own shard (``model-0000{r+1}-of-0000{P}.safetensors``; rank 0 adds every other tensor, the
index and ``config.json``), so saving never gathers all experts on one rank either. Every rank
must call :func:`save_hf_model` then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe.hf.families import adapter_for
from lightning_moe.hf.io import INDEX_NAME, copy_tokenizer_files, dtype_name, write_config, write_safetensors
from lightning_moe.io.atomic import atomic_file, atomic_path
from lightning_moe.models.decoder import MoEDecoder
from lightning_moe.moe.layer import MoE


def _full_state(model: MoEDecoder) -> tuple[dict[str, Tensor], dict[str, tuple[int, int]], bool]:
    """Our state dict with DTensors gathered, each MoE layer's local expert range, and whether experts are sharded."""
    from torch.distributed.tensor import DTensor

    local: dict[str, tuple[int, int]] = {}
    sharded = False
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            local[name] = (module.expert_offset, module.num_local_experts)
            sharded |= module.num_local_experts != module.num_experts
    state: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, rest = key.rpartition(".experts.")
        if isinstance(tensor, DTensor):
            is_expert = prefix in local and "." not in rest
            tensor = tensor.to_local() if is_expert else tensor.full_tensor()
        state[key] = tensor.detach()
    return state, local, sharded


def hf_state_dict(model: MoEDecoder, layout: str = "per_expert") -> dict[str, Tensor]:
    """The model's tensors under their Hugging Face names (all experts local; views, not copies).

    ``layout="fused"`` gives the names and shapes of a transformers 5 model's own ``state_dict``, so
    ``hf_model.load_state_dict(hf_state_dict(model, "fused"))`` copies our weights into it.

    Raises:
        ValueError: if the model's experts are sharded over ranks (use :func:`save_hf_model`).
    """
    state, local, sharded = _full_state(model)
    if sharded:
        raise ValueError(
            "the experts are sharded over ranks; hf_state_dict needs all experts (save_hf_model writes shards)"
        )
    full = {prefix: (0, n) for prefix, (_, n) in local.items()}
    entries = adapter_for(model.config.family).plan(
        model.config, layout, {k: tuple(v.shape) for k, v in state.items()}, full
    )
    tensors: dict[str, Tensor] = {}
    for entry in entries:
        tensors.update(entry.save(state))
    return tensors


def save_hf_model(
    model: MoEDecoder,
    path: str | os.PathLike,
    *,
    layout: str = "per_expert",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Write ``config.json`` and safetensors that ``transformers`` loads as ``model.config.family``.

    Args:
        model: the model; its ``config.family`` names the format (``mixtral``, ``qwen3_moe``,
            ``qwen2_moe``, ``olmoe``, ``deepseek_v3``, ``llama``, ``qwen3``).
        path: output directory (created).
        layout: expert tensors ``"per_expert"`` (default; every transformers version) or
            ``"fused"`` (transformers 5's in-memory layout).
        dtype: dtype of the written tensors; ``None`` keeps the parameters'.
        max_shard_bytes: largest safetensors file (unsharded experts only).
        tokenizer_dir: copy ``tokenizer.json`` and the other tokenizer/generation files from here.

    Raises:
        ValueError: if the family cannot express the model's configuration, or experts are sharded
            and ``layout="fused"``.
    """
    config = model.config
    adapter = adapter_for(config.family)
    hf_config = adapter.config_to_hf(config)
    state, local, sharded = _full_state(model)
    out_dtype = dtype or model.embed_tokens.weight.dtype
    hf_config["torch_dtype"] = dtype_name(out_dtype)
    out = Path(path)
    if not sharded:
        tensors = hf_state_dict(model, layout)
        if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
            write_safetensors(out, _cast(tensors, out_dtype), max_shard_bytes)
            write_config(out, hf_config)
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, out)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return
    _save_expert_sharded(model, out, layout, state, local, hf_config, out_dtype, tokenizer_dir)


def _cast(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    # Router correction biases stay float32, as the published checkpoints store them.
    return {k: t if k.endswith("e_score_correction_bias") else t.to(dtype) for k, t in tensors.items()}


def _save_expert_sharded(
    model: MoEDecoder,
    out: Path,
    layout: str,
    state: dict[str, Tensor],
    local: dict[str, tuple[int, int]],
    hf_config: dict,
    dtype: torch.dtype,
    tokenizer_dir: str | os.PathLike | None,
) -> None:
    if layout != "per_expert":
        raise ValueError(
            f"layout={layout!r} cannot be written while experts are sharded over ranks; use layout='per_expert' "
            "(each rank writes its own experts) or gather the experts first"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("the experts are sharded but torch.distributed is not initialised; save from every rank")
    config = model.config
    adapter = adapter_for(config.family)
    offset, num_local = next(iter(local.values()))
    P = config.num_experts // num_local
    ep_rank = offset // num_local
    # Expert-parallel ranks are consecutive: global ranks [0, P) form the first expert-parallel group.
    writes = dist.get_rank() < P
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for prefix in local:
        for w in ("w1", "w2", "w3"):
            key = f"{prefix}.experts.{w}"
            if key in shapes:
                shapes[key] = (config.num_experts, *shapes[key][1:])
    entries = adapter.plan(config, layout, shapes, local)
    files = [f"model-{r + 1:05d}-of-{P:05d}.safetensors" for r in range(P)]
    weight_map: dict[str, str] = {}
    mine: dict[str, Tensor] = {}
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for entry in entries:
        expert_kind = entry.kind == "experts"
        for e, (name, shape) in enumerate(entry.hf.items()):
            owner = e // num_local if expert_kind else 0
            weight_map[name] = files[owner]
            total += int(torch.Size(shape).numel()) * itemsize
        if expert_kind:
            w = state[entry.ours[0]]
            names = list(entry.hf)
            for i in range(num_local):
                mine[names[offset + i]] = w[i].t()
        elif ep_rank == 0:
            mine.update(entry.save(state))
    if writes:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in _cast(mine, dtype).items()}
        with atomic_path(out / files[ep_rank]) as tmp:  # each file complete or absent, never truncated
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        if ep_rank == 0:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with atomic_file(out / INDEX_NAME, "w") as f:
                f.write(json.dumps(index, indent=2) + "\n")
            (out / "model.safetensors").unlink(missing_ok=True)
            write_config(out, hf_config)
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, out)
    dist.barrier()


__all__ = ["hf_state_dict", "save_hf_model"]
