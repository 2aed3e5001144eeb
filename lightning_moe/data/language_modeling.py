"""A small language-modelling DataModule: the bundled corpus as one token stream cut into blocks.

Every sentence of every language (both sides of each pair, deduplicated) becomes
``<2xx> tokens </s>``; the sentences are shuffled with a fixed seed, concatenated, and cut
into non-overlapping blocks of ``seq_len + 1`` tokens. A block gives ``input_ids = block[:-1]``
and ``labels = block[1:]``, both ``[seq_len]``, with no padding.

``synthetic=True`` replaces the corpus with uniformly random tokens of a given vocabulary size.
That mode is for measuring throughput on large models only: nothing can be learned from it
(the loss stays at ``log(vocab_size)``).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from typing_extensions import override

from lightning_moe.data.batching import DistributedBatchSampler, ResumableDataLoader, ShuffledBatches, replicas_of
from lightning_moe.data.corpus import CorpusError, bundled_corpus_dir, hash_split, read_corpus
from lightning_moe.data.languages import check_language
from lightning_moe.data.tokenizer import Tokenizer, TokenizerCheckpointMixin

__all__ = ["LanguageModelDataModule"]


class _BlockDataset(Dataset):
    """Non-overlapping ``seq_len + 1`` windows of a token stream."""

    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.stream.numel() - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = index * self.seq_len
        block = self.stream[start : start + self.seq_len + 1]
        return {"input_ids": block[:-1], "labels": block[1:]}


class _SyntheticDataset(Dataset):
    """Uniformly random tokens; sample ``i`` is a pure function of ``(seed, i)``."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        block = torch.randint(self.vocab_size, (self.seq_len + 1,), generator=generator)
        return {"input_ids": block[:-1], "labels": block[1:]}


class LanguageModelDataModule(TokenizerCheckpointMixin, LightningDataModule):
    """Next-token prediction blocks from the multilingual corpus, or random tokens for throughput runs.

    Batches are dicts with ``input_ids`` and ``labels``, both ``[B, seq_len]`` long tensors;
    ``labels`` is ``input_ids`` shifted left by one.

    Args:
        seq_len: tokens per training example.
        batch_size: examples per batch (per device).
        data_dir: corpus directory (the formats of :mod:`lightning_moe.data.corpus`); None uses
            the bundled corpus.
        languages: keep only sentences in these languages; None keeps all.
        vocab_size: tokenizer vocabulary size (synthetic mode: the random tokens' range).
        tokenizer_path: JSON tokenizer to load, or where to save the one trained here. A
            tokenizer saved by :class:`~lightning_moe.data.MultilingualDataModule` on the same
            corpus works too.
        num_workers: DataLoader workers.
        seed: seed of the sentence shuffle (and of the synthetic tokens).
        synthetic: THROUGHPUT ONLY: serve uniformly random tokens instead of text.
        synthetic_samples: training examples per epoch in synthetic mode (validation gets a tenth).

    Raises:
        ValueError: on an out-of-range setting.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        data_dir: str | None = None,
        languages: list[str] | None = None,
        vocab_size: int = 4000,
        tokenizer_path: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        synthetic: bool = False,
        synthetic_samples: int = 10000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (
            ("seq_len", seq_len), ("batch_size", batch_size), ("vocab_size", vocab_size),
            ("synthetic_samples", synthetic_samples),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if languages is not None:
            for lang in languages:
                check_language(lang, "LanguageModelDataModule(languages=...)")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.data_dir = data_dir
        self.requested_languages = None if languages is None else list(languages)
        self.requested_vocab_size = vocab_size
        self.tokenizer_path = tokenizer_path
        self.num_workers = num_workers
        self.seed = seed
        self.synthetic = synthetic
        self.synthetic_samples = synthetic_samples
        self._tokenizer: Tokenizer | None = None
        self._streams: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ public properties

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer after :meth:`setup`; ``None`` in synthetic mode."""
        if self.synthetic:
            return None
        if self._tokenizer is None:
            raise RuntimeError("the tokenizer is not ready; call datamodule.setup() (the Trainer does) first")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size for the model: the tokenizer's once known, else the configured one."""
        if self._tokenizer is not None:
            return self._tokenizer.vocab_size
        if not self.synthetic and self.tokenizer_path is not None and Path(self.tokenizer_path).is_file():
            return Tokenizer.load(self.tokenizer_path).vocab_size
        return self.requested_vocab_size

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        """Train and save the tokenizer if ``tokenizer_path`` is set and missing (rank 0 only)."""
        if not self.synthetic and self.tokenizer_path is not None and not Path(self.tokenizer_path).is_file():
            train = self._read_sentences()["train"]
            self._train_tokenizer(train).save(self.tokenizer_path)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the corpus (nothing to do in synthetic mode)."""
        if self.synthetic or self._streams:
            return
        splits = self._read_sentences()
        train = splits["train"]
        if self._tokenizer is None:
            if self.tokenizer_path is not None and Path(self.tokenizer_path).is_file():
                self._tokenizer = Tokenizer.load(self.tokenizer_path)
            else:
                self._tokenizer = self._train_tokenizer(train)
                if self.tokenizer_path is not None:
                    self._tokenizer.save(self.tokenizer_path)
        self._streams = {split: self._stream(sentences) for split, sentences in splits.items() if sentences}

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled blocks of the training split."""
        return self._loader(self._dataset("train"), shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        """Blocks of the validation split, in order."""
        return self._loader(self._dataset("validation"), shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Blocks of the test split, in order."""
        return self._loader(self._dataset("test"), shuffle=False)

    # ------------------------------------------------------------------ internals

    def _dataset(self, split: str) -> Dataset:
        if self.synthetic:
            n = self.synthetic_samples if split == "train" else max(1, self.synthetic_samples // 10)
            seed = self.seed + ("train", "validation", "test").index(split)
            return _SyntheticDataset(n, self.seq_len, self.requested_vocab_size, seed)
        if not self._streams:
            raise RuntimeError(
                "LanguageModelDataModule is not set up; call datamodule.setup() (the Trainer does) first"
            )
        if split not in self._streams:
            source = "the bundled corpus" if self.data_dir is None else self.data_dir
            raise ValueError(
                f"{source} has no {split} split; add {split}.jsonl (or line-aligned {split}.* files) to the data"
            )
        dataset = _BlockDataset(self._streams[split], self.seq_len)
        if len(dataset) == 0:
            raise ValueError(
                f"the {split} split has {self._streams[split].numel()} tokens, fewer than one block of "
                f"seq_len + 1 = {self.seq_len + 1}; lower seq_len"
            )
        return dataset

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if shuffle:  # training: seeded order per epoch, whole batches per rank, resumable mid-epoch
            batches = ShuffledBatches(len(dataset), self.batch_size, seed=self.seed)  # type: ignore[arg-type]
            num_replicas, rank = replicas_of(getattr(self, "trainer", None))
            return ResumableDataLoader(
                dataset, DistributedBatchSampler(batches, num_replicas, rank), collate_fn=default_collate,
                num_workers=self.num_workers, seed=self.seed,
            )  # fmt: skip
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def _read_sentences(self) -> dict[str, list[tuple[str, str]]]:
        """``(language, sentence)`` lists of the train, validation and test splits, deduplicated."""
        source = bundled_corpus_dir() if self.data_dir is None else Path(self.data_dir)
        splits = read_corpus(source)
        if not splits["train"]:
            raise CorpusError(f"no training pairs in {source}; add train.jsonl or line-aligned train files")
        allowed = None if self.requested_languages is None else set(self.requested_languages)

        def sentences(split: str) -> list[tuple[str, str]]:
            found = {(lang, text) for e in splits[split] for lang, text in ((e.src_lang, e.src), (e.tgt_lang, e.tgt))}
            return sorted(s for s in found if allowed is None or s[0] in allowed)

        train, validation = sentences("train"), sentences("validation")
        if not validation:  # hold out ~5% of train by a stable hash of the sentence
            validation = [s for s in train if hash_split(s[1], 5, 0) == "validation"]
            train = [s for s in train if hash_split(s[1], 5, 0) != "validation"]
        if not train:
            raise ValueError(f"languages={self.requested_languages} leaves no training sentences in {source}")
        return {"train": train, "validation": validation, "test": sentences("test")}

    def _train_tokenizer(self, train: list[tuple[str, str]]) -> Tokenizer:
        languages = sorted({lang for lang, _ in train})
        texts = sorted({text for _, text in train})
        return Tokenizer.train(texts, vocab_size=self.requested_vocab_size, languages=languages)

    def _stream(self, sentences: list[tuple[str, str]]) -> Tensor:
        tok = self._tokenizer
        assert tok is not None
        order = list(sentences)
        random.Random(self.seed).shuffle(order)
        ids: list[int] = []
        for (lang, _), encoded in zip(order, tok.encode_batch([text for _, text in order]), strict=True):
            ids.append(tok.lang_token_id(lang))
            ids.extend(encoded)
            ids.append(tok.eos_id)
        return torch.tensor(ids, dtype=torch.long)

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Adopt a restored tokenizer and re-tokenize the corpus."""
        self._tokenizer = tokenizer
        self._streams = {}
        self.setup()
