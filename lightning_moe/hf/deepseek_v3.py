"""DeepSeek-V3: multi-head latent attention, sigmoid routing with a correction bias, group-limited top-k, shared experts.

The first ``first_k_dense_replace`` layers are dense. The released checkpoints also hold the
multi-token-prediction layer(s) (``model.layers.{num_hidden_layers + j}``), which inference (and
transformers) does not use: they are skipped, by name. The FP8 release is not read (its
``quantization_config`` is refused); load a bfloat16 copy.
"""

from __future__ import annotations

from typing import Any

from lightning_moe.hf.adapter import ConfigReader, FamilyAdapter, common_from_hf, common_to_hf, require_features
from lightning_moe.models.decoder_config import DecoderConfig


class DeepseekV3Adapter(FamilyAdapter):
    """``model_type: deepseek_v3``; shared experts are ``mlp.shared_experts``, the bias ``gate.e_score_correction_bias``."""

    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a DeepSeek-V3 ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        if r.get("scoring_func", "sigmoid") != "sigmoid" or r.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(
                f"deepseek_v3 with scoring_func={config.get('scoring_func')!r}, topk_method={config.get('topk_method')!r}"
                " is not supported; DeepSeek-V3 routes with sigmoid scores and a correction bias ('noaux_tc')"
            )
        n_layers = fields["n_layers"]
        first_dense = r.get("first_k_dense_replace", 0)
        freq = r.get("moe_layer_freq", 1)
        moe_layers = [i for i in range(n_layers) if i >= first_dense and i % freq == 0]
        bias = bool(r.get("attention_bias", False))
        r.first(("head_dim", "qk_head_dim"))  # derived from the MLA dimensions
        return DecoderConfig(
            **fields,
            d_ff=r.require("intermediate_size"),
            qkv_bias=bias,
            out_bias=bias,
            q_lora_rank=r.get("q_lora_rank"),
            kv_lora_rank=r.require("kv_lora_rank"),
            qk_nope_head_dim=r.require("qk_nope_head_dim"),
            qk_rope_head_dim=r.require("qk_rope_head_dim"),
            v_head_dim=r.require("v_head_dim"),
            rope_interleaved=bool(r.get("rope_interleave", True)),
            moe_layers=None if len(moe_layers) == n_layers else moe_layers,
            num_experts=r.first(("n_routed_experts", "num_local_experts")),
            top_k=r.require("num_experts_per_tok"),
            expert_ffn_size=r.require("moe_intermediate_size"),
            num_shared_experts=r.get("n_shared_experts") or 0,
            score_function="sigmoid",
            normalize_top_k=bool(r.get("norm_topk_prob", True)),
            routed_scaling_factor=float(r.get("routed_scaling_factor", 1.0)),
            expert_groups=r.get("n_group") or 1,
            top_groups=r.get("topk_group"),
            expert_bias=True,
            family="deepseek_v3",
            extra=r.extra(),
        )

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The DeepSeek-V3 ``config.json`` of a :class:`DecoderConfig`."""
        require_features(
            config, "deepseek_v3", is_mla=True, qkv_bias=config.out_bias, score_function="sigmoid",
            expert_bias=True, shared_expert_gate=False,
        )  # fmt: skip
        moe = config.moe_indices()
        first_dense = moe[0] if moe else config.n_layers
        if moe != list(range(first_dense, config.n_layers)):
            raise ValueError(
                f"deepseek_v3 has dense layers first and MoE layers after them; moe_layers={config.moe_layers} is not "
                "of that form"
            )
        if config.shared_expert_ffn_size not in (None, config.num_shared_experts * config.expert_ffn_hidden_size):
            raise ValueError(
                f"deepseek_v3's shared experts have width n_shared_experts * moe_intermediate_size; "
                f"shared_expert_ffn_size={config.shared_expert_ffn_size} is not"
            )
        out = common_to_hf(config, self.architecture, "deepseek_v3")
        out.update(
            attention_bias=config.qkv_bias,
            intermediate_size=config.d_ff,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            head_dim=config.qk_rope_head_dim,
            rope_interleave=config.rope_interleaved,
            first_k_dense_replace=first_dense,
            moe_layer_freq=1,
            n_routed_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            moe_intermediate_size=config.expert_ffn_hidden_size,
            n_shared_experts=config.num_shared_experts,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            norm_topk_prob=config.renormalizes,
            routed_scaling_factor=config.routed_scaling_factor,
            n_group=config.expert_groups,
            topk_group=config.top_groups or config.expert_groups,
        )
        return out

    def ignored_patterns(self, config: DecoderConfig) -> list[str]:
        """Rotary caches and the multi-token-prediction layers after the last decoder layer."""
        extra_layers = int(config.extra.get("num_nextn_predict_layers", 0) or 0)
        mtp = [rf"model\.layers\.{config.n_layers + j}\..*" for j in range(extra_layers)]
        return [*self.ignored, *mtp]
