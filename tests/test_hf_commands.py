"""lightning-moe convert and lightning-moe upcycle."""

import lightning as L
import pytest
import torch
import transformers as tf
from hf_tiny import VOCAB, save_tiny

from lightning_moe.cli import main
from lightning_moe.data import MultilingualDataModule
from lightning_moe.modules import CausalLMModule, MultitaskTranslationModule
from lightning_moe.surgery import load_checkpoint_dict
from lightning_moe.surgery.usage import translation_batches, translation_examples


def _run(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_convert_from_hf_to_checkpoint_and_back(tmp_path, capsys):
    hf = save_tiny("qwen3_moe", tmp_path / "src")
    ckpt = tmp_path / "model.ckpt"
    assert _run(["convert", "--from-hf", str(tmp_path / "src"), "--out", str(ckpt)]) == 0
    module = CausalLMModule.load_from_checkpoint(ckpt).eval()
    ids = torch.randint(VOCAB, (2, 12))
    with torch.no_grad():
        assert _rel_err(module(ids), hf(ids).logits) < 1e-5
    assert _run(["convert", "--ckpt", str(ckpt), "--to-hf", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert _run(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(ckpt)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_upcycle_hf_directory(tmp_path):
    dense = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "mixtral"
    argv = ["upcycle", "--ckpt", str(tmp_path / "llama"), "--num-experts", "8", "--top-k", "1", "--granularity", "2"]
    assert _run([*argv, "--out", str(out)]) == 0
    moe = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert moe.config.model_type == "mixtral" and moe.config.num_experts_per_tok == 2
    ids = torch.randint(VOCAB, (2, 12))
    with torch.no_grad():
        assert _rel_err(moe(ids).logits, dense(ids).logits) < 1e-6
    assert _run(["upcycle", "--ckpt", str(tmp_path / "llama"), "--num-experts", "6", "--granularity", "4",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip


DENSE = {
    "d_model": 32, "n_heads": 4, "d_ff": 48, "num_experts": 0, "moe_every": 0, "moe_backend": "torch",
    "dropout": 0.0, "n_encoder_layers": 2, "n_decoder_layers": 2, "max_positions": 64, "lr": 3e-3,
    "warmup_steps": 1, "num_eval_examples": 0,
}  # fmt: skip


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, **kw,
    )  # fmt: skip


def test_upcycle_translation_checkpoint_equals_dense_and_training_continues(tmp_path):
    dm = MultilingualDataModule(
        languages=["de"], vocab_size=300, batch_size=8, samples_per_epoch=32, max_length=24,
        tokenizer_path=str(tmp_path / "tok.json"),
    )  # fmt: skip
    L.seed_everything(0)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(MultitaskTranslationModule(**DENSE), dm)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    out = tmp_path / "moe.ckpt"
    argv = ["upcycle", "--ckpt", str(tmp_path / "dense.ckpt"), "--num-experts", "4", "--top-k", "1"]
    assert _run([*argv, "--granularity", "2", "--moe-every", "2", "--out", str(out)]) == 0
    dense = MultitaskTranslationModule.from_checkpoint(str(tmp_path / "dense.ckpt")).eval()
    moe = MultitaskTranslationModule.from_checkpoint(str(out)).eval()
    assert [len(list(m.model.moe_layers())) for m in (dense, moe)] == [0, 2]
    examples = translation_examples(None, "validation", None, ["de", "en"])[:32]
    for batch in translation_batches(dense.tokenizer, examples, 64, batch_size=16):
        with torch.no_grad():
            expected = dense(batch["src_ids"], batch["tgt_in"])
            got = moe(batch["src_ids"], batch["tgt_in"])
        real = batch["tgt_in"] != dense.pad_id  # padding positions: MoE layers output 0 there, dense FFNs do not
        assert _rel_err(got[real], expected[real]) < 1e-6
    # fit --ckpt_path continues from the upcycled weights at step 0 (lr=0: they stay exactly as written)
    hparams = load_checkpoint_dict(out)["hyper_parameters"]
    module = MultitaskTranslationModule(**{**hparams, "lr": 0.0})
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, dm, ckpt_path=out)
    assert trainer.global_step == 2
    written = load_checkpoint_dict(out)["state_dict"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, written[name]), name
