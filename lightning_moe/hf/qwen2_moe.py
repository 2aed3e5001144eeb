"""Qwen2-MoE (Alibaba): q/k/v biases, softmax top-k without renormalisation, one shared expert behind a sigmoid gate."""

from __future__ import annotations

from typing import Any

from lightning_moe.hf.adapter import (
    ConfigReader,
    FamilyAdapter,
    common_from_hf,
    common_to_hf,
    moe_layer_indices,
    require_features,
)
from lightning_moe.models.decoder_config import DecoderConfig


class Qwen2MoeAdapter(FamilyAdapter):
    """``model_type: qwen2_moe``; the shared expert is ``mlp.shared_expert`` with gate ``mlp.shared_expert_gate``."""

    model_types = ("qwen2_moe",)
    architecture = "Qwen2MoeForCausalLM"
    shared_prefix = "shared_expert"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a Qwen2-MoE ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        num_experts = r.first(("num_experts", "num_local_experts"))
        shared = r.get("shared_expert_intermediate_size", 0)
        return DecoderConfig(
            **fields,
            d_ff=r.require("intermediate_size"),
            qkv_bias=bool(r.get("qkv_bias", True)),  # Qwen2's q/k/v projections always had biases
            moe_layers=moe_layer_indices(
                fields["n_layers"], num_experts, r.get("mlp_only_layers") or [], r.get("decoder_sparse_step", 1)
            ),
            num_experts=num_experts,
            top_k=r.require("num_experts_per_tok"),
            expert_ffn_size=r.require("moe_intermediate_size"),
            num_shared_experts=1 if shared else 0,
            shared_expert_ffn_size=shared or None,
            shared_expert_gate=bool(shared),
            normalize_top_k=bool(r.get("norm_topk_prob", False)),
            aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
            family="qwen2_moe",
            extra=r.extra(),
        )

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The Qwen2-MoE ``config.json`` of a :class:`DecoderConfig`."""
        require_features(
            config, "qwen2_moe", out_bias=False, qk_norm=None, clip_qkv=None, is_mla=False, num_shared_experts=1,
            shared_expert_gate=True, score_function="softmax", expert_groups=1, routed_scaling_factor=1.0,
            expert_bias=False, rope_interleaved=False, attention_head_dim=config.d_model // config.n_heads,
        )  # fmt: skip
        out = common_to_hf(config, self.architecture, "qwen2_moe")
        moe = set(config.moe_indices())
        out.update(
            qkv_bias=config.qkv_bias,
            intermediate_size=config.d_ff,
            moe_intermediate_size=config.expert_ffn_hidden_size,
            shared_expert_intermediate_size=config.shared_expert_ffn_size or config.expert_ffn_hidden_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            norm_topk_prob=config.renormalizes,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.n_layers) if i not in moe],
            router_aux_loss_coef=config.aux_loss_weight,
            use_sliding_window=False,
        )
        return out
