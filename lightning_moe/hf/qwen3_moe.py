"""Qwen3-MoE (Alibaba): per-head q/k RMSNorm, softmax top-k (renormalised in the released models), no shared expert."""

from __future__ import annotations

from typing import Any

from lightning_moe.hf.adapter import (
    ConfigReader,
    FamilyAdapter,
    common_from_hf,
    common_to_hf,
    head_dim_from_hf,
    moe_layer_indices,
    require_features,
)
from lightning_moe.models.decoder_config import DecoderConfig


class Qwen3MoeAdapter(FamilyAdapter):
    """``model_type: qwen3_moe``; dense layers from ``mlp_only_layers`` / ``decoder_sparse_step``."""

    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a Qwen3-MoE ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        num_experts = r.first(("num_experts", "num_local_experts"))
        bias = bool(r.get("attention_bias", False))
        return DecoderConfig(
            **fields,
            head_dim=head_dim_from_hf(r),
            d_ff=r.require("intermediate_size"),
            qkv_bias=bias,
            out_bias=bias,
            qk_norm="head",
            moe_layers=moe_layer_indices(
                fields["n_layers"], num_experts, r.get("mlp_only_layers") or [], r.get("decoder_sparse_step", 1)
            ),
            num_experts=num_experts,
            top_k=r.require("num_experts_per_tok"),
            expert_ffn_size=r.require("moe_intermediate_size"),
            normalize_top_k=bool(r.get("norm_topk_prob", False)),
            aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
            family="qwen3_moe",
            extra=r.extra(),
        )

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The Qwen3-MoE ``config.json`` of a :class:`DecoderConfig`."""
        require_features(
            config, "qwen3_moe", qkv_bias=config.out_bias, qk_norm="head", clip_qkv=None, is_mla=False,
            num_shared_experts=0, score_function="softmax", expert_groups=1, routed_scaling_factor=1.0,
            expert_bias=False, rope_interleaved=False,
        )  # fmt: skip
        out = common_to_hf(config, self.architecture, "qwen3_moe")
        moe = set(config.moe_indices())
        out.update(
            head_dim=config.attention_head_dim,
            attention_bias=config.qkv_bias,
            intermediate_size=config.d_ff,
            moe_intermediate_size=config.expert_ffn_hidden_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            norm_topk_prob=config.renormalizes,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.n_layers) if i not in moe],
            router_aux_loss_coef=config.aux_loss_weight,
            use_sliding_window=False,
            sliding_window=None,
        )
        return out
