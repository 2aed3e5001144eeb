"""MoEDecoder: parameter arithmetic, KV cache, padding, rotary scalings, config validation."""

import math

import pytest
import torch

from lightning_moe.models import DecoderConfig, MoEDecoder
from lightning_moe.models.rope import rope_frequencies

GQA = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, num_experts=4, top_k=2,
           moe_layers=[1, 2], qk_norm="head", qkv_bias=True, num_shared_experts=1, shared_expert_ffn_size=24,
           shared_expert_gate=True)  # fmt: skip
MLA = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=8, top_k=2, q_lora_rank=16,
           kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_interleaved=True,
           score_function="sigmoid", expert_bias=True, expert_groups=4, top_groups=2, num_shared_experts=1,
           tie_embeddings=True, out_bias=True, qkv_bias=True)  # fmt: skip


@pytest.mark.parametrize("kw", [GQA, MLA, {**GQA, "qk_norm": "full", "num_experts": 0, "moe_layers": None}])
def test_parameter_count_matches_the_built_model(kw):
    cfg = DecoderConfig(**kw)
    model = MoEDecoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.total_parameters()
    per_token = cfg.active_parameters_per_token()
    if cfg.num_experts:
        moe = len(cfg.moe_indices())
        assert cfg.total_parameters() - per_token == moe * (cfg.num_experts - cfg.top_k) * 3 * 32 * cfg.d_ff


@pytest.mark.parametrize("kw", [GQA, MLA])
def test_kv_cache_decoding_equals_full_recompute(kw):
    torch.manual_seed(0)
    model = MoEDecoder(DecoderConfig(**kw)).eval()
    ids = torch.randint(50, (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :6], cache=cache), model(ids[:, 6:9], cache=cache), model(ids[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    generated = model.generate(ids[:, :4], 6)
    with torch.no_grad():
        for t in range(4, 10):  # each greedy token is the argmax of a full recompute
            assert torch.equal(model(generated[:, :t])[:, -1].argmax(-1), generated[:, t])


def test_right_padding_does_not_change_real_tokens_and_is_not_routed():
    torch.manual_seed(0)
    model = MoEDecoder(DecoderConfig(**GQA)).eval()
    ids = torch.randint(50, (2, 9))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        padded = model(ids, padding_mask_BT=pad)
        assert next(model.moe_layers()).last_stats.num_tokens == 2 * 9 - 4
        alone = model(ids[1:, :5])
    torch.testing.assert_close(padded[1, :5], alone[0], rtol=1e-5, atol=1e-5)


def test_rope_scalings_match_transformers():
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "linear": {"rope_type": "linear", "factor": 4.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
    }  # fmt: skip
    for name, scaling in cases.items():
        cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=2048,
                             rope_parameters={**scaling, "rope_theta": 10000.0})  # fmt: skip
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[name](cfg, "cpu")
        inv, factor = rope_frequencies(32, 10000.0, scaling)
        torch.testing.assert_close(inv, ref_inv, msg=name)
        assert math.isclose(factor, ref_factor), name


def test_invalid_configs_name_the_field():
    base = dict(vocab_size=10, d_model=32, n_layers=2, n_heads=4, d_ff=8)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        DecoderConfig(**base, n_kv_heads=3)
    with pytest.raises(ValueError, match="qk_norm='layer'"):
        DecoderConfig(**base, qk_norm="layer")
    with pytest.raises(ValueError, match="rope_scaling type 'longrope'"):
        DecoderConfig(**base, rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match=r"moe_layers=\[5\]"):
        DecoderConfig(**base, moe_layers=[5])
    with pytest.raises(ValueError, match="top_groups=3"):
        DecoderConfig(**base, num_experts=4, expert_groups=2, top_groups=3)
    model = MoEDecoder(DecoderConfig(**base, max_positions=8))
    with pytest.raises(ValueError, match="max_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
