"""Dense -> MoE upcycling: the upcycled model computes the dense model's function at step 0."""

import pytest
import torch
import transformers as tf
from hf_tiny import VOCAB, save_tiny

from lightning_moe.hf import load_hf_model, save_hf_model
from lightning_moe.models import GPT, EncoderDecoderTransformer, GPTConfig, TransformerConfig
from lightning_moe.moe import MoE
from lightning_moe.surgery import upcycle, upcycled_config


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _dense_m3(activation):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                            num_experts=0, dropout=0.1, activation=activation)  # fmt: skip
    return EncoderDecoderTransformer(cfg).eval()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(("num_experts", "top_k", "granularity"), [(4, 2, 1), (8, 1, 2), (8, 2, 4)])
def test_upcycled_encoder_decoder_equals_dense(activation, num_experts, top_k, granularity):
    dense = _dense_m3(activation)
    moe = upcycle(dense, num_experts, top_k, granularity, moe_every=2)
    assert moe.config.decoder_moe_indices() == [1] and moe.config.encoder_moe_indices() == [1]
    layer = next(moe.moe_layers())
    assert layer.num_experts == num_experts and layer.top_k == top_k * granularity
    assert layer.experts.w1.shape == (num_experts, 32, 64 // granularity)
    src, tgt = torch.randint(60, (3, 9)), torch.randint(60, (3, 7))
    src_pad = torch.zeros(3, 9, dtype=torch.bool)
    src_pad[2, 6:] = True
    with torch.no_grad():
        expected = dense(src, tgt, src_padding_mask_BS=src_pad)
        got = moe(src, tgt, src_padding_mask_BS=src_pad)
    assert _rel_err(got, expected) < 1e-6
    assert layer.last_stats.dropped == 0


def test_upcycled_gpt_equals_dense_and_its_router_learns():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_layers=2, num_experts=0, dropout=0.0,
                          activation="swiglu"))  # fmt: skip
    moe = upcycle(dense, num_experts=4, top_k=2)
    ids = torch.randint(60, (2, 10))
    with torch.no_grad():
        assert _rel_err(moe(ids), dense(ids)) < 1e-6
    moe.train()
    moe(ids).logsumexp(-1).sum().backward()
    for layer in moe.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 0  # two renormalised choices: the task loss reaches the router


@pytest.mark.parametrize(("family", "moe_family"), [("llama", "mixtral"), ("qwen3", "qwen3_moe")])
@pytest.mark.parametrize(("num_experts", "top_k", "granularity"), [(4, 2, 1), (8, 1, 2)])
def test_upcycled_hf_dense_decoder_equals_dense_in_ours_and_in_transformers(
    tmp_path, family, moe_family, num_experts, top_k, granularity
):
    hf_dense = save_tiny(family, tmp_path / "dense")
    dense = load_hf_model(tmp_path / "dense")
    moe = upcycle(dense, num_experts, top_k, granularity)
    assert moe.config.family == moe_family
    ids = torch.randint(VOCAB, (2, 12))
    with torch.no_grad():
        reference = hf_dense(ids).logits
        assert _rel_err(moe(ids), dense(ids)) < 1e-6
    save_hf_model(moe, tmp_path / "moe")
    hf_moe = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert hf_moe.config.model_type == moe_family
    with torch.no_grad():
        assert _rel_err(hf_moe(ids).logits, reference) < 1e-6


def test_upcycling_errors_name_the_value():
    dense = _dense_m3("gelu")
    with pytest.raises(ValueError, match="granularity=3 does not divide"):
        upcycle(dense, 6, 1, 3)
    with pytest.raises(ValueError, match="num_experts=6 is not a multiple of granularity=4"):
        upcycle(dense, 6, 1, 4)
    with pytest.raises(ValueError, match="exceeds num_experts=4"):
        upcycle(dense, 4, 3, 2)
    moe_cfg = upcycled_config(dense.config, 4, 2)
    with pytest.raises(ValueError, match="already has MoE"):
        upcycled_config(moe_cfg, 4, 2)
    assert all(isinstance(m, MoE) for m in [b.ffn for b in upcycle(dense, 4, 2).decoder])
