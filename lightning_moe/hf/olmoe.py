"""OLMoE (AI2): q/k RMSNorm over the whole projections, optional q/k/v clipping, softmax top-k without renormalisation."""

from __future__ import annotations

from typing import Any

from lightning_moe.hf.adapter import ConfigReader, FamilyAdapter, common_from_hf, common_to_hf, require_features
from lightning_moe.models.decoder_config import DecoderConfig


class OlmoeAdapter(FamilyAdapter):
    """``model_type: olmoe``; every layer MoE, experts of width ``intermediate_size``."""

    model_types = ("olmoe",)
    architecture = "OlmoeForCausalLM"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of an OLMoE ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        bias = bool(r.get("attention_bias", False))
        return DecoderConfig(
            **fields,
            d_ff=r.require("intermediate_size"),
            qkv_bias=bias,
            out_bias=bias,
            qk_norm="full",
            clip_qkv=r.get("clip_qkv"),
            num_experts=r.first(("num_experts", "num_local_experts")),
            top_k=r.require("num_experts_per_tok"),
            normalize_top_k=bool(r.get("norm_topk_prob", False)),
            aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
            family="olmoe",
            extra=r.extra(),
        )

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The OLMoE ``config.json`` of a :class:`DecoderConfig`."""
        require_features(
            config, "olmoe", qkv_bias=config.out_bias, qk_norm="full", is_mla=False, num_shared_experts=0,
            score_function="softmax", expert_groups=1, routed_scaling_factor=1.0, expert_bias=False,
            rope_interleaved=False, all_layers_moe=True, attention_head_dim=config.d_model // config.n_heads,
        )  # fmt: skip
        out = common_to_hf(config, self.architecture, "olmoe")
        out.update(
            attention_bias=config.qkv_bias,
            clip_qkv=config.clip_qkv,
            intermediate_size=config.expert_ffn_hidden_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            norm_topk_prob=config.renormalizes,
            router_aux_loss_coef=config.aux_loss_weight,
        )
        return out
