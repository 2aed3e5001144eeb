"""Tests of the LightningModules (translation, language model), their losses and schedules, and the LM data."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_moe.data import MultilingualDataModule, Tokenizer
from lightning_moe.data.language_modeling import LanguageModelDataModule
from lightning_moe.modules import LanguageModelModule, MultitaskTranslationModule, label_smoothed_nll, lr_multiplier

TINY = {"d_model": 32, "n_heads": 4, "d_ff": 48, "num_experts": 4, "moe_backend": "torch", "dropout": 0.0}
TINY_TRANSLATION = {**TINY, "n_encoder_layers": 2, "n_decoder_layers": 2, "max_positions": 64}
TINY_LM = {**TINY, "n_layers": 2, "max_positions": 64}
SENTENCES = [
    ("Save changes", "Änderungen speichern"),
    ("Delete selected items", "Ausgewählte Elemente löschen"),
    ("Enter a valid date.", "Bitte ein gültiges Datum eingeben."),
    ("This field is required.", "Dieses Feld ist zwingend erforderlich."),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CPUs
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
    }  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [s for pair in SENTENCES for s in pair]
    return Tokenizer.train(texts, vocab_size=300, languages=["de", "en"])


def _batch(tok: Tokenizer) -> dict[str, torch.Tensor]:
    """en->de and de->en examples in the datamodule's format: ``<2tgt> src </s>``, ``<2tgt> tgt``, ``tgt </s>``."""
    rows = []
    for en, de in SENTENCES:
        rows.append((tok.encode(en), tok.encode(de), "de", 0))
        rows.append((tok.encode(de), tok.encode(en), "en", 1))

    def pad(seqs):
        out = torch.full((len(seqs), max(map(len, seqs))), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
        return out

    return {
        "src_ids": pad([[tok.lang_token_id(t), *s, tok.eos_id] for s, _, t, _ in rows]),
        "tgt_in": pad([[tok.lang_token_id(t), *y] for _, y, t, _ in rows]),
        "tgt_out": pad([[*y, tok.eos_id] for _, y, _, _ in rows]),
        "direction": torch.tensor([d for *_, d in rows]),
        "task": torch.zeros(len(rows), dtype=torch.long),
    }


# ----------------------------------------------------------------------------- loss and schedules


def test_label_smoothing_matches_hand_computation():
    torch.manual_seed(0)
    V, eps, pad = 7, 0.1, 0
    logits = torch.randn(2, 5, V)
    target = torch.randint(1, V, (2, 5))
    target[1, 3:] = pad
    loss, nll, mask = label_smoothed_nll(logits, target, eps, ignore_index=pad)

    expected = torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            if target[b, t] == pad:
                continue
            p = torch.softmax(logits[b, t].double(), -1)
            q = torch.full((V,), eps / V, dtype=torch.double)
            q[target[b, t]] += 1 - eps
            expected[b, t] = -(q * p.log()).sum()
    torch.testing.assert_close(loss, expected.float())
    assert mask.sum() == 8
    assert float(nll[1, 3:].abs().sum()) == 0.0
    reference = F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=pad, label_smoothing=eps)
    torch.testing.assert_close(loss.sum() / mask.sum(), reference)
    torch.testing.assert_close(
        nll.sum() / mask.sum(), F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=pad)
    )


def test_lr_schedules():
    inv = lr_multiplier("inverse_sqrt", warmup_steps=4)
    assert [inv(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert inv(15) == pytest.approx(math.sqrt(4 / 16))
    cos = lr_multiplier("cosine", warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert cos(1) == 1.0
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(11) == pytest.approx(0.1)
    assert cos(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="max_steps"):
        lr_multiplier("cosine", warmup_steps=2)
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_multiplier("linear", warmup_steps=2)


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="d_model=32 is not divisible by n_heads=5"):
        MultitaskTranslationModule(**{**TINY_TRANSLATION, "n_heads": 5})
    with pytest.raises(ValueError, match="schedule='linear'"):
        MultitaskTranslationModule(**TINY_TRANSLATION, schedule="linear")
    with pytest.raises(ValueError, match=r"label_smoothing=1\.0"):
        MultitaskTranslationModule(**TINY_TRANSLATION, label_smoothing=1.0)
    with pytest.raises(ValueError, match="top_k=3"):
        LanguageModelModule(**{**TINY_LM, "num_experts": 2}, top_k=3)


# ----------------------------------------------------------------------------- translation


def test_translation_training_reduces_loss(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = MultitaskTranslationModule(**TINY_TRANSLATION, lr=1e-2, warmup_steps=2, label_smoothing=0.1)
    module.attach_tokenizer(tokenizer, ["en-de", "de-en"])
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = float(module.training_losses(batch)["loss"])
    trainer = _trainer(tmp_path, max_steps=15)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 15, batch_size=None))
    with torch.no_grad():
        after = float(module.training_losses(batch)["loss"])
    assert after < 0.7 * before
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/ce", "train/nll", "train/aux_loss", "train/lr"} <= set(metrics)
    assert float(metrics["train/aux_loss"]) > 0
    torch.testing.assert_close(metrics["train/loss"], metrics["train/ce"] + metrics["train/aux_loss"])


def test_fit_with_datamodule_logs_per_direction_metrics_and_checkpoint_translates(tmp_path):
    torch.manual_seed(0)
    dm = MultilingualDataModule(
        languages=["de"], vocab_size=400, batch_size=8, samples_per_epoch=16, max_length=24,
        tokenizer_path=str(tmp_path / "tok.json"),
    )  # fmt: skip
    module = MultitaskTranslationModule(
        **TINY_TRANSLATION, lr=3e-3, warmup_steps=1, beam_size=2, num_eval_examples=2, eval_max_length=4
    )
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=2, num_sanity_val_steps=0,
                       logger=CSVLogger(tmp_path))  # fmt: skip
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    expected = {"val/loss", "val/ppl", "val/loss_en-de", "val/bleu", "val/chrf", "val/bleu_greedy", "val/chrf_greedy"}
    expected |= {f"val/{m}_{d}" for m in ("bleu", "chrf", "bleu_greedy", "chrf_greedy") for d in ("en-de", "de-en")}
    assert expected <= set(metrics), expected - set(metrics)
    assert module.directions == dm.directions

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = MultitaskTranslationModule.from_checkpoint(path)
    assert restored.tokenizer == dm.tokenizer
    assert restored.directions == dm.directions
    texts = ["Save changes", "Enter a valid date."]
    module.eval()
    for beam in (1, 2):
        assert restored.translate(texts, "de", beam_size=beam, max_length=6) == module.translate(
            texts, "de", beam_size=beam, max_length=6
        )
    src = torch.tensor([dm.encode_source(t, "de") for t in texts[:1]])
    assert restored.predict_step({"src_ids": src}, 0) == restored.translate(texts[:1], "de")


def test_translate_needs_a_tokenizer():
    module = MultitaskTranslationModule(**TINY_TRANSLATION)
    with pytest.raises(RuntimeError, match="attach_tokenizer"):
        module.translate(["hi"], "de")


# ----------------------------------------------------------------------------- language model


def test_language_model_training_reduces_loss_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    dm = LanguageModelDataModule(seq_len=16, batch_size=4, languages=["de"], vocab_size=300)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    module = LanguageModelModule(**TINY_LM, lr=1e-2, warmup_steps=2, schedule="inverse_sqrt", vocab_size=dm.vocab_size)
    trainer = _trainer(tmp_path, max_steps=12, limit_val_batches=2, num_sanity_val_steps=0)
    with torch.no_grad():
        before = float(module.training_losses(batch)["loss"])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 12, batch_size=None),
                val_dataloaders=DataLoader([batch], batch_size=None))  # fmt: skip
    with torch.no_grad():
        after = float(module.training_losses(batch)["loss"])
    assert after < 0.7 * before
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(
        math.exp(float(trainer.callback_metrics["val/loss"])), rel=1e-4
    )

    path = tmp_path / "lm.ckpt"
    trainer.save_checkpoint(path)
    restored = LanguageModelModule.load_from_checkpoint(path)
    restored.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch["input_ids"]), module(batch["input_ids"]))


def test_language_model_fit_with_datamodule_and_text_generation(tmp_path):
    torch.manual_seed(0)
    dm = LanguageModelDataModule(seq_len=16, batch_size=4, languages=["de"], vocab_size=300)
    module = LanguageModelModule(**TINY_LM, warmup_steps=1)
    trainer = _trainer(tmp_path, fast_dev_run=2, logger=CSVLogger(tmp_path))
    trainer.fit(module, dm)
    assert module.model is not None and module.model.config.vocab_size == dm.vocab_size
    assert {"train/loss", "val/loss", "val/ppl"} <= set(trainer.callback_metrics)
    assert isinstance(module.generate("Änderungen", lang="de", max_new_tokens=4, temperature=0.0), str)


def test_synthetic_language_model_data(tmp_path):
    dm = LanguageModelDataModule(seq_len=8, batch_size=2, vocab_size=50, synthetic=True, synthetic_samples=6)
    dm.setup("fit")
    assert dm.tokenizer is None and dm.vocab_size == 50
    first = next(iter(dm.val_dataloader()))
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(first["input_ids"], again["input_ids"])  # deterministic
    assert int(first["input_ids"].max()) < 50
    module = LanguageModelModule(**TINY_LM, warmup_steps=1, schedule="cosine", max_steps=3)
    _trainer(tmp_path, fast_dev_run=1).fit(module, dm)
    assert module.model is not None and module.model.config.vocab_size == 50


def test_lm_datamodule_test_split(tmp_path):
    import json

    bundled = LanguageModelDataModule(seq_len=16, batch_size=4, vocab_size=600)
    bundled.setup()
    batch = next(iter(bundled.test_dataloader()))
    assert batch["input_ids"].shape == (4, 16)

    rows = [
        {"src_lang": "en", "tgt_lang": "de", "src": f"sentence number {i}", "tgt": f"Satz Nummer {i}"}
        for i in range(300)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    own = LanguageModelDataModule(data_dir=str(tmp_path), seq_len=8, batch_size=2, vocab_size=400)
    own.setup()
    with pytest.raises(ValueError, match=r"has no test split; add test\.jsonl"):
        own.test_dataloader()
