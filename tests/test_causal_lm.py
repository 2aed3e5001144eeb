"""CausalLMModule and the hf_finetune recipe: fine-tuning a Hugging Face directory and writing it back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers as tf

from lightning_moe.data import TextDataModule, hash_split
from lightning_moe.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_tiny_hf_model
    finally:
        sys.path.pop(0)
    make_tiny_hf_model.main(["--family", "mixtral", "--out", str(out), "--vocab-size", "300"])
    return out


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def test_text_datamodule_tokenizes_with_the_model_tokenizer(tiny_dir, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document number {i} about experts"}) for i in range(40)) + "\n")
    dm = TextDataModule(str(tiny_dir), train_files=[str(docs)], seq_len=8, batch_size=2, eos_token="</s>")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8) and torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    hf_tok = tf.AutoTokenizer.from_pretrained(tiny_dir)
    texts = [f"document number {i} about experts" for i in range(40)]
    val = [t for t in texts if hash_split(t, 5, 0) == "validation"]
    expected = []
    for text in (t for t in texts if t not in val):
        expected += hf_tok(text, add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
    assert dm._datasets["train"].stream.tolist() == expected
    assert dm.eos_id == hf_tok.eos_token_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        TextDataModule(str(tiny_dir), train_files=[str(bad)]).setup()


def test_module_loads_pretrained_weights_and_checkpoint_needs_no_directory(tiny_dir, tmp_path):
    module = CausalLMModule(pretrained=str(tiny_dir), config_overrides={"aux_loss_weight": 0.0})
    dm = TextDataModule(str(tiny_dir), seq_len=16, batch_size=2, max_documents=200)
    trainer = _trainer(tmp_path, limit_val_batches=1)
    trainer.validate(module, dm)  # experts are read at the start of validation
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(300, (2, 10))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["pretrained"] is None
    reloaded = CausalLMModule.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), module(ids))
    with pytest.raises(ValueError, match="pass pretrained"):
        CausalLMModule()


def test_hf_finetune_recipe_two_process_expert_parallel(tiny_dir, tmp_path):
    out = tmp_path / "hf"
    cmd = [
        sys.executable, "-m", "lightning_moe", "fit", "-c", str(ROOT / "recipes" / "hf_finetune.yaml"),
        f"--model.init_args.pretrained={tiny_dir}", f"--data.init_args.tokenizer={tiny_dir}",
        f"--model.init_args.save_hf_dir={out}", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.max_documents=400",
        "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # each of the 2 expert-parallel ranks wrote its own experts
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert (out / "tokenizer.json").is_file()
    before = tf.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()
    after = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(before) == set(after)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("experts.down_proj"))
    metrics = (tmp_path / "metrics.csv").read_text()  # the recipe's fixed run directory
    assert "val/loss" in metrics
