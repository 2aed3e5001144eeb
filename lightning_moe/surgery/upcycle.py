"""Dense -> MoE upcycling: every expert starts as (a slice of) the dense FFN, and the model computes the dense function.

Legend: D model width, F dense FFN width, m granularity, E experts, K top-k.

Sparse upcycling (Komatsuzaki et al. 2023) replaces a dense FFN by ``E`` copies of it behind a
router. With dropless routing and renormalised top-k weights the upcycled layer outputs
``sum_k w_k * ffn(x) = ffn(x)``: the model is the dense model, whatever the router, and training
continues from there. Fine-grained upcycling (He et al. 2024, "Upcycling Large Language Models into
Mixture of Experts"; Megatron-Core's granularity option) splits the FFN into ``m`` slices of width
``F / m`` (a SwiGLU or GELU FFN is a sum over its hidden units, so the slices add up to it):
expert ``c * m + j`` is slice ``j`` of copy ``c``, its output projection scaled by ``m``, top-k is
``K * m``, and every copy's ``m`` router rows are equal, so a token picks all slices of the same
``K`` copies with weights ``p_c / (m * sum p)``; the slices of a copy sum to ``m * ffn(x) / m``.
The router rows of different slices receive different gradients, so they separate in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lightning_moe.models.config import GPTConfig, TransformerConfig
from lightning_moe.models.decoder_config import DecoderConfig
from lightning_moe.models.transformer import FeedForward
from lightning_moe.moe.layer import MoE

ModelConfig = TransformerConfig | GPTConfig | DecoderConfig


def _moe_every(n_layers: int, every: int) -> list[int]:
    return [i for i in range(n_layers) if (i + 1) % every == 0]


def upcycled_config(
    config: ModelConfig, num_experts: int, top_k: int = 1, granularity: int = 1, moe_every: int = 1
) -> ModelConfig:
    """The configuration of the upcycled model.

    Args:
        config: the dense model's configuration (its chosen layers must be dense).
        num_experts: E, experts per MoE layer (``E / granularity`` copies of the FFN).
        top_k: K, copies each token uses; the router picks ``K * granularity`` experts.
        granularity: m, slices each copy of the FFN is split into (1: whole-FFN experts).
        moe_every: layer ``i`` becomes MoE when ``(i + 1) % moe_every == 0`` (1: every layer, 2:
            every other layer as in the M3 recipes).

    Returns:
        A config of the same type with the MoE layers, dropless routing with renormalised
        weights (so that the upcycled model computes the dense function; change
        ``capacity_factor`` afterwards to train with capacity), and the MoE family of a Hugging
        Face dense family (Llama -> Mixtral, Qwen3 -> Qwen3-MoE).

    Raises:
        ValueError: naming the bad value and the fix.
    """
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if moe_every < 1:
        raise ValueError(f"moe_every={moe_every} must be >= 1 (1: every layer becomes MoE)")
    d_ff = config.d_ff
    if d_ff % granularity:
        raise ValueError(f"granularity={granularity} does not divide the FFN width d_ff={d_ff}; choose a divisor")
    if num_experts % granularity:
        raise ValueError(
            f"num_experts={num_experts} is not a multiple of granularity={granularity}; use "
            f"{granularity} x the number of FFN copies"
        )
    if top_k * granularity > num_experts:
        raise ValueError(
            f"top_k={top_k} copies x granularity={granularity} = {top_k * granularity} experts per token exceeds "
            f"num_experts={num_experts}; lower top_k or add experts"
        )
    common: dict[str, Any] = dict(
        num_experts=num_experts, top_k=top_k * granularity, expert_ffn_size=d_ff // granularity,
        capacity_factor=None, eval_capacity_factor=None, normalize_top_k=True, score_function="softmax",
        routed_scaling_factor=1.0, expert_groups=1, top_groups=None, expert_bias=False, bias_update_rate=0.0,
        num_shared_experts=0,
    )  # fmt: skip
    if isinstance(config, DecoderConfig):
        _require_dense(config.moe_indices(), "layers")
        from lightning_moe.hf.families import UPCYCLED_FAMILY

        family = UPCYCLED_FAMILY.get(config.family or "", config.family)
        layers = _moe_every(config.n_layers, moe_every)
        return dataclasses.replace(
            config, **common, moe_layers=None if len(layers) == config.n_layers else layers, family=family,
            shared_expert_ffn_size=None, shared_expert_gate=False,
        )  # fmt: skip
    if isinstance(config, TransformerConfig):
        _require_dense(config.encoder_moe_indices(), "encoder layers")
        _require_dense(config.decoder_moe_indices(), "decoder layers")
        return dataclasses.replace(
            config, **common, moe_every=moe_every,
            moe_encoder_layers=_moe_every(config.n_encoder_layers, moe_every),
            moe_decoder_layers=_moe_every(config.n_decoder_layers, moe_every),
        )  # fmt: skip
    _require_dense(config.moe_indices(), "layers")
    return dataclasses.replace(config, **common, moe_every=moe_every, moe_layers=_moe_every(config.n_layers, moe_every))


def _require_dense(moe_layers: list[int], what: str) -> None:
    if moe_layers:
        raise ValueError(f"the model already has MoE {what} {moe_layers}; upcycling starts from a dense model")


@torch.no_grad()
def upcycle_ffn(ffn: FeedForward, moe: MoE, granularity: int, generator: torch.Generator | None = None) -> None:
    """Fill ``moe``'s experts from the dense ``ffn`` and set its router so that ``moe(x) == ffn(x)``.

    Args:
        ffn: the dense FFN (``w1``, ``w3`` ``[F, D]``, ``w2`` ``[D, F]`` linear layers).
        moe: an MoE layer with all experts local, ``E`` a multiple of ``granularity`` and expert
            width ``F / granularity``.
        granularity: m.
        generator: random numbers of the router rows (one per copy).
    """
    E, m = moe.num_experts, granularity
    F = ffn.w1.weight.shape[0]
    Fm = F // m
    w1_FD, w2_DF = ffn.w1.weight, ffn.w2.weight
    w3_FD = ffn.w3.weight if ffn.w3 is not None else None
    experts = moe.experts
    for e in range(E):
        j = e % m
        rows = slice(j * Fm, (j + 1) * Fm)
        experts.w1[e].copy_(w1_FD[rows].t())
        experts.w2[e].copy_(m * w2_DF[:, rows].t())
        if w3_FD is not None and experts.w3 is not None:
            experts.w3[e].copy_(w3_FD[rows].t())
    router = moe.router
    D = router.weight.shape[1]
    copies = torch.randn(E // m, D, generator=generator, dtype=torch.float32) * D**-0.5
    router.weight.copy_(copies.repeat_interleave(m, dim=0).to(router.weight))


def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int = 1,
    granularity: int = 1,
    moe_every: int = 1,
    seed: int = 0,
) -> nn.Module:
    """A copy of a dense model with its FFNs turned into MoE layers that compute the same function.

    Works for :class:`~lightning_moe.models.EncoderDecoderTransformer`,
    :class:`~lightning_moe.models.GPT` and :class:`~lightning_moe.models.MoEDecoder` (e.g. a dense
    Llama or Qwen3 from :func:`lightning_moe.hf.load_hf_model`). Every tensor of the new model is
    either copied from the dense one or built from its FFNs (checked).

    Args:
        model: the dense model (a ``config`` attribute with its configuration).
        num_experts: E, experts per MoE layer.
        top_k: K, FFN copies per token (the router picks ``K * granularity`` experts).
        granularity: m, slices of each FFN copy (fine-grained upcycling).
        moe_every: which layers become MoE (see :func:`upcycled_config`).
        seed: seed of the router initialisation.

    Returns:
        The upcycled model (same class, new config), on the dense model's device and dtype, in
        eval mode if the dense one was.

    Raises:
        ValueError: on an invalid setting (see :func:`upcycled_config`).
    """
    config = upcycled_config(model.config, num_experts, top_k, granularity, moe_every)  # type: ignore[arg-type]
    weight = next(model.parameters())
    with torch.device("meta"):
        new = type(model)(config)
    new = new.to_empty(device=weight.device).to(weight.dtype)
    old_state = model.state_dict()
    filled: set[str] = set()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in new.named_modules():
            if isinstance(module, MoE):
                ffn = model.get_submodule(name)
                assert isinstance(ffn, FeedForward), name
                upcycle_ffn(ffn, module, granularity, generator)
                filled.update(f"{name}.{key}" for key in module.state_dict())
        new_state = new.state_dict(keep_vars=True)
        for key, tensor in new_state.items():
            if key in filled:
                continue
            if key not in old_state or old_state[key].shape != tensor.shape:
                raise AssertionError(f"upcycled tensor {key!r} has no dense counterpart")  # a bug, not bad input
            tensor.copy_(old_state[key])
    _copy_nonpersistent_buffers(model, new)
    new.train(model.training)
    return new


def _copy_nonpersistent_buffers(src: nn.Module, dst: nn.Module) -> None:
    """Non-persistent buffers (position tables, load counters) are not in state dicts: copy or zero them."""
    src_buffers = dict(src.named_buffers())
    with torch.no_grad():
        for name, buf in dst.named_buffers():
            if name in src_buffers and src_buffers[name].shape == buf.shape:
                buf.copy_(src_buffers[name])
            elif name.endswith("expert_load"):
                buf.zero_()


__all__ = ["upcycle", "upcycle_ffn", "upcycled_config"]
