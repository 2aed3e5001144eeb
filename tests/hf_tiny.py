"""Tiny random Hugging Face models of every supported family, built with transformers (no network)."""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3")
DENSE_FAMILIES = ("llama", "qwen3")
VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


def tiny_config(family: str, **overrides) -> tf.PretrainedConfig:
    """A 2-layer, width-32 config of ``family`` that exercises the family's features."""
    common = {**_COMMON, **overrides}
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":  # a dense first layer, per-head q/k norms, head_dim != hidden / heads
        return tf.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
        )  # fmt: skip
    if family == "qwen2_moe":  # q/k/v biases, gated shared expert, no renormalisation
        return tf.Qwen2MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        )  # fmt: skip
    if family == "olmoe":  # whole-projection q/k norms, q/k/v clipping, no renormalisation
        return tf.OlmoeConfig(**common, intermediate_size=24, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0)
    if family == "deepseek_v3":  # MLA with q compression, YaRN, sigmoid + bias, groups, shared expert, dense layer 0
        return tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, routed_scaling_factor=2.5,
            rope_scaling={
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
            },
        )  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common, intermediate_size=64)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, intermediate_size=64)
    raise ValueError(family)


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> tf.PreTrainedModel:
    """A float32 eval-mode model of ``family`` with random weights large enough to route decisively."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"  # the plain reference (ours uses SDPA)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
            if "norm" in name:
                p.add_(1.0)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model


def save_tiny(family: str, path, seed: int = 0, fused: bool = False, **overrides) -> tf.PreTrainedModel:
    """Build :func:`tiny_hf_model` and ``save_pretrained`` it to ``path`` (per-expert layout unless ``fused``)."""
    model = tiny_hf_model(family, seed, **overrides)
    model.save_pretrained(str(path), save_original_format=not fused)
    return model
