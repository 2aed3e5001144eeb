"""Tests of the data package: corpus, tokenizer, sampling, noise, DataModule."""

from __future__ import annotations

import gzip
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.data import (
    ISO_639_1,
    SPLITS,
    TASK_DENOISING,
    TASK_TRANSLATION,
    CorpusError,
    MultilingualDataModule,
    TemperatureSampler,
    Tokenizer,
    bundled_corpus_dir,
    masked_token_count,
    read_corpus,
    read_jsonl,
    span_mask,
    temperature_probabilities,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundled() -> dict:
    return read_corpus(bundled_corpus_dir())


@pytest.fixture(scope="module")
def datamodule() -> MultilingualDataModule:
    dm = MultilingualDataModule(batch_size=16, samples_per_epoch=2000)
    dm.setup("fit")
    return dm


def _write_aligned(root: Path, split: str, src: str, tgt: str, pairs: list[tuple[str, str]]) -> None:
    (root / f"{split}.{src}-{tgt}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (root / f"{split}.{src}-{tgt}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# ---------------------------------------------------------------- bundled corpus


def test_bundled_corpus_languages_and_disjoint_splits(bundled: dict) -> None:
    langs = {e.tgt_lang for e in bundled["train"]}
    assert len(langs) >= 10
    assert all(e.src_lang == "en" for split in SPLITS for e in bundled[split])
    assert langs <= ISO_639_1
    english = {split: {e.src for e in bundled[split]} for split in SPLITS}
    assert not english["train"] & english["validation"]
    assert not english["train"] & english["test"]
    assert not english["validation"] & english["test"]
    for split in ("validation", "test"):
        assert {e.tgt_lang for e in bundled[split]} == langs
    per_lang = Counter(e.tgt_lang for e in bundled["train"])
    assert min(per_lang.values()) >= 500
    size = sum(p.stat().st_size for p in bundled_corpus_dir().iterdir())
    assert size < 5_000_000


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_ids(datamodule: MultilingualDataModule, bundled: dict) -> None:
    tok = datamodule.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 4)
    assert tok.vocab_size == 4000 == datamodule.vocab_size
    tags = {tok.lang_token_id(lang) for lang in datamodule.languages}
    assert len(tags) == len(datamodule.languages) == 15
    assert tags <= tok.special_ids and {0, 1, 2, 3, 4} <= tok.special_ids
    assert tok.id_to_token(tok.lang_token_id("de")) == "<2de>"
    assert tok.id_to_token(tok.mask_id) == "<mask>"
    texts = [t for split in SPLITS for e in bundled[split] for t in (e.src, e.tgt)]
    for text in texts:
        ids = tok.encode(text)
        assert not tok.special_ids & set(ids)
        assert tok.decode(ids) == text
    odd = [
        "",
        " ",
        "  two  spaces\tand\ttabs\n",
        "emoji 🤖🚀 and ǅ",
        "e\u0301 combining",
        "<mask> <2de> </s>",
        "a_b 123",
    ]
    for text in odd:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match=r"'xx'.*knows"):
        tok.lang_token_id("xx")


def test_tokenizer_dict_and_file_round_trip(datamodule: MultilingualDataModule, tmp_path: Path) -> None:
    tok = datamodule.tokenizer
    state = json.loads(json.dumps(tok.to_dict()))
    again = Tokenizer.from_dict(state)
    assert again == tok
    sample = "Sind Sie sicher? 你确定要删除吗 Вы уверены"
    assert again.encode(sample) == tok.encode(sample)
    tok.save(tmp_path / "sub" / "tok.json")
    assert Tokenizer.load(tmp_path / "sub" / "tok.json") == tok
    with pytest.raises(ValueError, match="not a lightning_moe tokenizer"):
        Tokenizer.from_dict({"format": "other"})


def test_tokenizer_training_is_deterministic_and_sized(bundled: dict) -> None:
    texts = [e.tgt for e in bundled["train"] if e.tgt_lang in ("de", "ja")][:600]
    a = Tokenizer.train(texts, vocab_size=900, languages=["de", "ja"])
    b = Tokenizer.train(list(texts), vocab_size=900, languages=["de", "ja"])
    assert a == b and a.vocab_size == 900
    tiny = Tokenizer.train(["ab ab"], vocab_size=400, languages=["en"])
    assert tiny.vocab_size == 400  # runs out of merges: filled with <unused_N>
    assert tiny.decode(tiny.encode("abc ☃")) == "abc ☃"
    with pytest.raises(ValueError, match=r"vocab_size=100 "):
        Tokenizer.train(texts, vocab_size=100, languages=["de"])


# ---------------------------------------------------------------- sampling


def test_temperature_sampler_matches_expected_frequencies() -> None:
    sizes, temperature, draws = [5000, 500, 50, 5], 5.0, 100_000
    expected = temperature_probabilities(sizes, temperature)
    n = torch.tensor(sizes, dtype=torch.float64) ** (1 / temperature)
    assert torch.allclose(torch.tensor(expected, dtype=torch.float64), n / n.sum())
    sampler = TemperatureSampler(sizes, expected, draws, seed=0)
    offsets = [0, 5000, 5500, 5550]
    counts = Counter(max(g for g in range(4) if flat >= offsets[g]) for flat, _ in sampler)
    observed = [counts[g] for g in range(4)]
    chi2 = sum((o - draws * p) ** 2 / (draws * p) for o, p in zip(observed, expected, strict=True))
    assert chi2 < 16.27, (observed, expected)  # chi-square, 3 dof, p = 0.001
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same draws
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_datamodule_direction_and_task_frequencies(datamodule: MultilingualDataModule) -> None:
    probs = datamodule.sampling_probabilities
    assert set(probs) == set(datamodule.directions)
    assert abs(sum(probs.values()) - 1) < 1e-9
    assert abs(sum(p for d, p in probs.items() if d.split("-")[0] == d.split("-")[1]) - 0.5) < 1e-9
    dm = MultilingualDataModule(samples_per_epoch=40_000, denoising_ratio=0.3, temperature=1.0)
    dm._tokenizer = datamodule.tokenizer  # reuse: skip retraining
    dm._load_corpus()
    dm._set_tokenizer(datamodule.tokenizer)
    loader = dm.train_dataloader()
    dataset = loader.dataset.dataset  # the loader fetches whole batches through a wrapper
    directions = Counter()
    for flat, _ in loader.sampler.source:
        g = next(i for i in range(len(dataset.offsets) - 1) if flat < dataset.offsets[i + 1])
        directions[dm.directions[dataset.groups[g].direction]] += 1
    expected = dm.sampling_probabilities
    denoise = sum(c for d, c in directions.items() if d.split("-")[0] == d.split("-")[1]) / 40_000
    assert abs(denoise - 0.3) < 0.015
    # T = 1: translation directions in proportion to their pair counts
    sizes = {dm.directions[g.direction]: len(g.sources) for g in dataset.groups if g.task == TASK_TRANSLATION}
    total = sum(sizes.values())
    for d in ("en-de", "es-en", "uk-en"):
        assert abs(expected[d] - 0.7 * sizes[d] / total) < 1e-9
        assert abs(directions[d] / 40_000 - expected[d]) < 0.006


# ---------------------------------------------------------------- noise


def test_span_mask_ratio_and_structure() -> None:
    rng = random.Random(0)
    removed = total = spans = 0
    for _ in range(4000):
        tokens = [rng.randrange(10, 100) for _ in range(rng.randrange(1, 60))]
        corrupted = span_mask(tokens, 0.35, mask_id=4, rng=rng)
        removed += masked_token_count(len(tokens), corrupted, 4)
        total += len(tokens)
        spans += corrupted.count(4)
        kept = [t for t in corrupted if t != 4]
        it = iter(tokens)  # kept tokens are an in-order subsequence of the original
        assert all(any(t == u for u in it) for t in kept)
        assert all(a != 4 or b != 4 for a, b in itertools.pairwise(corrupted))  # spans never touch
    assert abs(removed / total - 0.35) < 0.01
    assert 2.2 < removed / spans < 3.5  # mean span length near Poisson(3), minus cuts and insertions
    assert span_mask([7, 8, 9], 0.0, 4, rng) == [7, 8, 9]
    assert span_mask([7, 8, 9], 1.0, 4, rng) == [4]
    with pytest.raises(ValueError, match=r"noise_ratio=1\.5"):
        span_mask([1], 1.5, 4, rng)


def test_denoising_batches_have_configured_ratio(datamodule: MultilingualDataModule) -> None:
    tok = datamodule.tokenizer
    removed = total = examples = denoising = 0
    for batch in datamodule.train_dataloader():
        for i in range(batch["task"].shape[0]):
            examples += 1
            if batch["task"][i] != TASK_DENOISING:
                continue
            denoising += 1
            src = batch["src_ids"][i][batch["src_mask"][i]].tolist()
            tgt = [t for t in batch["tgt_out"][i].tolist() if t != tok.pad_id]
            assert (
                src[0] == batch["tgt_in"][i, 0] == tok.lang_token_id(datamodule.directions[batch["direction"][i]][:2])
            )
            assert src[-1] == tgt[-1] == tok.eos_id
            removed += masked_token_count(len(tgt) - 1, src[1:-1], tok.mask_id)
            total += len(tgt) - 1
    assert examples == 2000
    assert abs(denoising / examples - 0.5) < 0.05
    assert abs(removed / total - 0.35) < 0.02


def test_batch_layout(datamodule: MultilingualDataModule) -> None:
    tok = datamodule.tokenizer
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"src_ids", "src_mask", "tgt_in", "tgt_out", "direction", "task"}
    assert batch["src_ids"].dtype == torch.long and batch["src_mask"].dtype == torch.bool
    assert batch["tgt_in"].shape == batch["tgt_out"].shape
    shifted = batch["tgt_in"][:, 1:] != tok.pad_id  # tgt_in is tgt_out shifted right behind the tag
    assert (batch["tgt_in"][:, 1:] == batch["tgt_out"][:, :-1])[shifted].all()
    lengths = (batch["tgt_out"] != tok.pad_id).sum(1)
    assert (batch["tgt_out"].gather(1, (lengths - 1)[:, None]) == tok.eos_id).all()
    val = list(datamodule.val_dataloader())
    directions = torch.cat([b["direction"] for b in val]).tolist()
    assert directions == sorted(directions) and set(directions) == set(range(len(datamodule.translation_directions)))
    assert all((b["task"] == TASK_TRANSLATION).all() for b in val)
    assert max(b["src_ids"].shape[1] for b in val) <= datamodule.max_length
    first = val[0]
    direction = datamodule.directions[first["direction"][0]]
    src_text, ref = datamodule.val_examples(direction)[0]
    assert tok.decode(first["src_ids"][0].tolist()) == src_text
    assert tok.decode(first["tgt_out"][0].tolist()) == ref
    assert datamodule.encode_source(src_text, "ar")[0] == datamodule.decoder_start_id("ar")
    with pytest.raises(ValueError, match="'de-de' is not a translation direction"):
        datamodule.val_examples("de-de")
    # A subset is a fixed sample spread over the split, not its (placeholder-heavy) prefix.
    everything = datamodule.val_examples(direction)
    subset = datamodule.val_examples(direction, 8)
    assert subset == datamodule.val_examples(direction, 8)
    assert len(subset) == 8 and set(subset) <= set(everything) and subset != everything[:8]


def test_state_dict_restores_tokenizer(datamodule: MultilingualDataModule, tmp_path: Path) -> None:
    state = json.loads(json.dumps(datamodule.state_dict()))
    path = tmp_path / "tok.json"
    datamodule.tokenizer.save(path)
    dm = MultilingualDataModule(languages=["de", "fr"], tokenizer_path=str(path))
    assert dm.vocab_size == 4000  # read from tokenizer_path before setup
    dm.setup()
    assert dm.languages == ["de", "en", "fr"] and dm.tokenizer == datamodule.tokenizer
    dm.load_state_dict(state)
    assert dm.tokenizer == datamodule.tokenizer


# ---------------------------------------------------------------- user corpora


def test_both_layouts_load(tmp_path: Path) -> None:
    de = [(f"house number {i}", f"Hausnummer {i}") for i in range(40)]
    fr = [{"src_lang": "fr", "tgt_lang": "en", "src": f"maison {i}", "tgt": f"house {i}"} for i in range(30)]
    _write_aligned(tmp_path, "train", "en", "de", de)
    _write_aligned(tmp_path, "valid", "de", "en", [("Haus", "house")])
    _write_jsonl(tmp_path / "train.jsonl", fr)
    with gzip.open(tmp_path / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"src_lang": "en", "tgt_lang": "fr", "src": "a house", "tgt": "une maison"}) + "\n")
    (tmp_path / "README.txt").write_text("ignored")
    corpus = read_corpus(tmp_path)
    assert len(corpus["train"]) == 70 and len(corpus["validation"]) == 1 and len(corpus["test"]) == 1
    dm = MultilingualDataModule(data_dir=str(tmp_path), vocab_size=400, batch_size=4, samples_per_epoch=8)
    dm.setup()
    assert dm.languages == ["de", "en", "fr"]
    assert dm.translation_directions == ["en-de", "de-en", "en-fr", "fr-en"]
    assert dm.directions[4:] == ["de-de", "en-en", "fr-fr"]
    assert dm.val_examples("en-de") == [("house", "Haus")]
    assert dm.test_examples("fr-en") == [("une maison", "a house")]
    assert sum(b["task"].shape[0] for b in dm.train_dataloader()) == 8
    assert len(dm.val_dataloader().dataset) == 2  # en-de and de-en; en-fr has no validation pairs


def test_missing_validation_is_carved_from_train(tmp_path: Path) -> None:
    _write_aligned(tmp_path, "train", "en", "es", [(f"sentence {i}", f"frase {i}") for i in range(400)])
    dm = MultilingualDataModule(data_dir=str(tmp_path), vocab_size=400, samples_per_epoch=8)
    dm.setup()
    val, test = dm.val_examples("en-es"), dm.test_examples("en-es")
    assert 5 <= len(val) <= 40 and 5 <= len(test) <= 40
    train = {e.src for e in dm._splits["train"]}
    assert not train & {s for s, _ in val} and not train & {s for s, _ in test}


def test_empty_split_errors(tmp_path: Path) -> None:
    _write_aligned(tmp_path, "train", "en", "de", [("a", "b")] * 3)
    _write_aligned(tmp_path, "validation", "en", "it", [("c", "d")])
    _write_aligned(tmp_path, "test", "en", "it", [("c", "d")])
    dm = MultilingualDataModule(data_dir=str(tmp_path), vocab_size=400)
    dm.setup()
    with pytest.raises(CorpusError, match=r"validation split of .* is empty"):
        dm.val_dataloader()


# ---------------------------------------------------------------- corrupt input


def test_misaligned_files_name_both_files_and_counts(tmp_path: Path) -> None:
    (tmp_path / "train.en-de.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "train.en-de.de").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"train\.en-de\.en has 3 lines but .*train\.en-de\.de has 2"):
        read_corpus(tmp_path)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "train.en-de.en").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "train.en-de.de").write_bytes(b"eins\nzw\xffei\n")
    with pytest.raises(CorpusError, match=r"train\.en-de\.de:2: invalid UTF-8"):
        read_corpus(tmp_path)
    (tmp_path / "train.jsonl").write_bytes(b'{"src_lang": "en", "tgt_lang": "de", "src": "a", "tgt": "\xc3"}\n')
    with pytest.raises(CorpusError, match=r"train\.jsonl:1: invalid UTF-8"):
        read_jsonl(tmp_path / "train.jsonl")


def test_unknown_language_names_code_and_known_ones(tmp_path: Path) -> None:
    good = {"src_lang": "en", "tgt_lang": "de", "src": "a", "tgt": "b"}
    _write_jsonl(tmp_path / "train.jsonl", [good, {**good, "tgt_lang": "ge"}])
    with pytest.raises(CorpusError, match=r"train\.jsonl:2: unknown language code 'ge'.*Known codes: aa ab"):
        read_corpus(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    _write_aligned(tmp_path, "train", "en", "xx", [("a", "b")])
    with pytest.raises(CorpusError, match=r"train\.en-xx\.\w+: unknown language code 'xx'.* de "):
        read_corpus(tmp_path)
    with pytest.raises(ValueError, match="unknown language code 'german'"):
        MultilingualDataModule(languages=["german"])
    with pytest.raises(ValueError, match=r"includes \['eo'\].*available"):
        MultilingualDataModule(languages=["eo"]).setup()


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "a", "tgt": "b"})
    (tmp_path / "train.jsonl").write_text(f"{good}\n\n{good}\n{{not json\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"train\.jsonl:4: malformed JSON"):
        read_corpus(tmp_path)
    (tmp_path / "train.jsonl").write_text(f'{good}\n{{"src_lang": "en", "tgt_lang": "de", "src": "a"}}\n')
    with pytest.raises(CorpusError, match=r"train\.jsonl:2: field 'tgt' is missing"):
        read_corpus(tmp_path)
    (tmp_path / "train.jsonl").write_text('["en", "de"]\n')
    with pytest.raises(CorpusError, match=r"train\.jsonl:1: expected a JSON object"):
        read_corpus(tmp_path)


def test_empty_corpus_and_missing_partner(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no training pairs"):
        MultilingualDataModule(data_dir=str(tmp_path)).setup()
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no training pairs"):
        MultilingualDataModule(data_dir=str(tmp_path)).setup()
    (tmp_path / "train.en-de.en").write_text("a\n")
    with pytest.raises(CorpusError, match=r"train\.en-de\.en: its parallel partner .*train\.en-de\.de is missing"):
        read_corpus(tmp_path)
    with pytest.raises(CorpusError, match="is not a directory"):
        read_corpus(tmp_path / "nope")


def test_bad_arguments_name_value_and_fix() -> None:
    with pytest.raises(ValueError, match=r"denoising_ratio=1.5 must be in \[0, 1\]"):
        MultilingualDataModule(denoising_ratio=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        MultilingualDataModule(temperature=0)
    with pytest.raises(ValueError, match="max_length=2"):
        MultilingualDataModule(max_length=2)


# ---------------------------------------------------------------- Lightning integration


class _TinyTranslator(L.LightningModule):
    def __init__(self, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.out = torch.nn.Linear(8, vocab_size)
        self.pad_id = pad_id

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self.out(self.embed(batch["tgt_in"]) + self.embed(batch["src_ids"]).mean(1, keepdim=True))
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=self.pad_id
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=batch["src_ids"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_with_worker_and_checkpoint(datamodule: MultilingualDataModule, tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    datamodule.tokenizer.save(path)
    dm = MultilingualDataModule(batch_size=4, samples_per_epoch=12, num_workers=1, tokenizer_path=str(path))
    model = _TinyTranslator(dm.vocab_size, dm.pad_id)
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert Tokenizer.from_dict(checkpoint["MultilingualDataModule"]["tokenizer"]) == datamodule.tokenizer


def test_train_loader_deals_whole_buckets_to_each_rank(datamodule: MultilingualDataModule) -> None:
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    single = datamodule.train_dataloader()
    # A DistributedSampler, so Lightning does not wrap it in its shuffling DistributedSamplerWrapper.
    assert isinstance(single.sampler, DistributedSampler) and single.sampler.num_replicas == 1
    every = single.sampler.source.batches(3)
    shards = []
    for rank in range(2):
        datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        try:
            loader = datamodule.train_dataloader()
        finally:
            datamodule.trainer = None
        loader.sampler.set_epoch(3)
        shards.append(list(loader.sampler))
        assert len(loader) == len(every) // 2
    for rank, shard in enumerate(shards):
        assert shard == every[rank::2][: len(every) // 2]  # whole length buckets, in order
    example = single.dataset.dataset[shards[1][0][0]]
    assert example["src"][-1] == datamodule.tokenizer.eos_id


def test_length_bucketing_keeps_draws_and_groups_lengths():
    from lightning_moe.data.sampling import TemperatureSampler

    sizes, weights = [30, 50], [0.4, 0.6]
    lengths = [(i * 7919) % 40 + 1 for i in range(80)]
    plain = list(TemperatureSampler(sizes, weights, 400, seed=3))
    bucketed = list(TemperatureSampler(sizes, weights, 400, seed=3, lengths=lengths, batch_size=8, bucket_batches=10))
    assert sorted(plain) == sorted(bucketed)  # the same draws (and noise seeds), reordered
    assert plain != bucketed

    def mean_spread(draws):
        batches = [draws[i : i + 8] for i in range(0, len(draws), 8)]
        return sum(max(lengths[f] for f, _ in b) - min(lengths[f] for f, _ in b) for b in batches) / len(batches)

    assert mean_spread(bucketed) < 0.25 * mean_spread(plain)


def test_misspelled_split_file_is_named_in_a_warning(tmp_path: Path) -> None:
    from lightning_moe.data.corpus import CorpusWarning

    record = {"src_lang": "en", "tgt_lang": "de", "src": "Save", "tgt": "Speichern"}
    _write_jsonl(tmp_path / "train.jsonl", [record])
    _write_jsonl(tmp_path / "validaton.jsonl", [record])
    (tmp_path / "README.md").write_text("not a split file: no warning")
    with pytest.warns(
        CorpusWarning, match=r"validaton\.jsonl: 'validaton' is not a split name \(did you mean 'validation'\?\)"
    ):
        corpus = read_corpus(tmp_path)
    assert len(corpus["train"]) == 1 and corpus["validation"] == []
