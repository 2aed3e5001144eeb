"""sacreBLEU-compatible translation scores: pooled BLEU statistics, chrF vs chrF++, and what the module logs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from lightning_moe.data import MultilingualDataModule
from lightning_moe.modules import MultitaskTranslationModule
from lightning_moe.modules.translation_metrics import CorpusStatistics, bleu_tokenizer, translation_scores

HYPS = ["The cat sat on the mat.", "Delete the selected items", "Save changes now"]
REFS = ["The cat sat on a mat.", "Delete selected items", "Save the changes"]


def test_pooled_statistics_equal_the_corpus_bleu_of_the_concatenation():
    stats = CorpusStatistics()
    stats.add(HYPS[:2], REFS[:2], "en")
    stats.add(HYPS[2:], REFS[2:], "de")  # both 13a: pooling must equal one corpus of all sentences
    expected = BLEU().corpus_score(HYPS, [REFS]).score
    assert stats.bleu() == pytest.approx(expected, abs=1e-9)
    assert 0 < stats.bleu() < 100


def test_chrf_is_chrf2_without_word_ngrams_and_chrfpp_has_them():
    scores = translation_scores(HYPS, REFS, "en")
    assert scores["chrf"] == pytest.approx(CHRF(char_order=6, word_order=0, beta=2).corpus_score(HYPS, [REFS]).score)
    assert scores["chrfpp"] == pytest.approx(CHRF(word_order=2).corpus_score(HYPS, [REFS]).score)
    assert scores["chrf"] != scores["chrfpp"]
    assert translation_scores(REFS, REFS, "en") == pytest.approx({"bleu": 100.0, "chrf": 100.0, "chrfpp": 100.0})
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        translation_scores(HYPS, REFS[:2])


def test_chinese_bleu_is_tokenized_by_character():
    hyp, ref = ["我们保存了所有的更改"], ["我们保存了全部的更改"]  # one word differs, no spaces
    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("de") == "13a"
    assert BLEU(tokenize="13a").corpus_score(hyp, [ref]).score < 5  # one "word" each: no n-gram matches
    assert translation_scores(hyp, ref, "zh")["bleu"] > 30


def test_module_logs_the_sacrebleu_scores_of_its_translations(tmp_path):
    torch.manual_seed(0)
    dm = MultilingualDataModule(
        languages=["de"], vocab_size=300, batch_size=8, samples_per_epoch=16, max_length=24,
        tokenizer_path=str(tmp_path / "tok.json"),
    )  # fmt: skip
    module = MultitaskTranslationModule(
        d_model=32, n_heads=4, d_ff=48, num_experts=4, n_encoder_layers=2, n_decoder_layers=2, max_positions=64,
        moe_backend="torch", dropout=0.0, lr=3e-3, warmup_steps=1, beam_size=2, num_eval_examples=4,
        eval_max_length=6,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    pooled = CorpusStatistics()
    chrf = []
    for direction in ("en-de", "de-en"):
        examples = dm.val_examples(direction, 4)
        tgt = direction.split("-")[1]
        hyps = module.translate([s for s, _ in examples], tgt, beam_size=2, max_length=6)
        refs = [r for _, r in examples]
        expected = translation_scores(hyps, refs, tgt)
        pooled.add(hyps, refs, tgt)
        chrf.append(expected["chrf"])
        for name, value in expected.items():
            assert float(metrics[f"val/{name}_{direction}"]) == pytest.approx(value, abs=1e-4)
    assert float(metrics["val/bleu"]) == pytest.approx(pooled.bleu(), abs=1e-4)
    assert float(metrics["val/chrf"]) == pytest.approx(sum(chrf) / 2, abs=1e-4)
    assert {"val/chrfpp", "val/chrfpp_greedy", "val/chrf_greedy_en-de"} <= set(metrics)
