"""Mixtral (Mistral AI): every layer MoE, softmax top-2 with renormalised weights, no shared expert."""

from __future__ import annotations

from typing import Any

from lightning_moe.hf.adapter import (
    ConfigReader,
    FamilyAdapter,
    common_from_hf,
    common_to_hf,
    head_dim_from_hf,
    require_features,
)
from lightning_moe.models.decoder_config import DecoderConfig


class MixtralAdapter(FamilyAdapter):
    """``model_type: mixtral``; per-expert checkpoints name the block ``block_sparse_moe`` and experts ``w1, w3, w2``."""

    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"
    per_expert_moe_prefix = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a Mixtral ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        return DecoderConfig(
            **fields,
            head_dim=head_dim_from_hf(r),
            d_ff=r.require("intermediate_size"),
            num_experts=r.require("num_local_experts"),
            top_k=r.require("num_experts_per_tok"),
            normalize_top_k=True,
            aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
            family="mixtral",
            extra=r.extra(),
        )

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The Mixtral ``config.json`` of a :class:`DecoderConfig`."""
        require_features(
            config, "mixtral", qkv_bias=False, out_bias=False, qk_norm=None, clip_qkv=None, is_mla=False,
            num_shared_experts=0, score_function="softmax", renormalizes=True, expert_groups=1,
            routed_scaling_factor=1.0, expert_bias=False, rope_interleaved=False, all_layers_moe=True,
        )  # fmt: skip
        out = common_to_hf(config, self.architecture, "mixtral")
        out.update(
            head_dim=config.attention_head_dim,
            intermediate_size=config.expert_ffn_hidden_size,
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            router_aux_loss_coef=config.aux_loss_weight,
            sliding_window=None,
        )
        return out
