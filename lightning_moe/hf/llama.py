"""Dense decoders that upcycling starts from: Llama (``llama``) and Qwen3 (``qwen3``, per-head q/k norms).

Loaded as a :class:`~lightning_moe.models.MoEDecoder` with no MoE layer; once upcycled they save
as their MoE counterparts (Llama -> Mixtral, Qwen3 -> Qwen3-MoE).
"""

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


class LlamaAdapter(FamilyAdapter):
    """``model_type: llama`` (rotary scaling ``llama3`` included); ``mlp_bias`` must be false."""

    model_types = ("llama",)
    architecture = "LlamaForCausalLM"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a Llama ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        if r.get("mlp_bias", False):
            raise ValueError("llama with mlp_bias=true is not supported; the FFNs (and experts) are bias-free")
        bias = bool(r.get("attention_bias", False))
        r.get("pretraining_tp")
        return DecoderConfig(
            **fields, head_dim=head_dim_from_hf(r), d_ff=r.require("intermediate_size"), qkv_bias=bias, out_bias=bias,
            num_experts=0, family="llama", extra=r.extra(),
        )  # fmt: skip

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The Llama ``config.json`` of a dense :class:`DecoderConfig`."""
        require_features(
            config, "llama", num_experts=0, qkv_bias=config.out_bias, qk_norm=None, clip_qkv=None, is_mla=False
        )
        out = common_to_hf(config, self.architecture, "llama")
        out.update(
            head_dim=config.attention_head_dim, intermediate_size=config.d_ff, attention_bias=config.qkv_bias,
            mlp_bias=False,
        )  # fmt: skip
        return out


class Qwen3Adapter(FamilyAdapter):
    """``model_type: qwen3``: Llama with per-head q/k RMSNorm."""

    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:
        """The :class:`DecoderConfig` of a Qwen3 ``config.json``."""
        r = ConfigReader(config)
        fields = common_from_hf(r)
        bias = bool(r.get("attention_bias", False))
        return DecoderConfig(
            **fields, head_dim=head_dim_from_hf(r), d_ff=r.require("intermediate_size"), qkv_bias=bias, out_bias=bias,
            qk_norm="head", num_experts=0, family="qwen3", extra=r.extra(),
        )  # fmt: skip

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        """The Qwen3 ``config.json`` of a dense :class:`DecoderConfig`."""
        require_features(config, "qwen3", num_experts=0, qkv_bias=config.out_bias, qk_norm="head", is_mla=False)
        out = common_to_hf(config, self.architecture, "qwen3")
        out.update(
            head_dim=config.attention_head_dim, intermediate_size=config.d_ff, attention_bias=config.qkv_bias,
            use_sliding_window=False, sliding_window=None,
        )  # fmt: skip
        return out
