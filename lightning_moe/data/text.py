"""Language-modelling blocks of plain text, tokenized with a Hugging Face ``tokenizer.json``.

For fine-tuning a published model on text: the documents (JSONL files with a text field, or every
sentence of the bundled corpus) are tokenized with the model's own tokenizer (read by
:class:`~lightning_moe.data.Tokenizer`, the ``tokenizers`` library), each followed by an optional end-of-sequence token, concatenated, and cut into
non-overlapping blocks of ``seq_len + 1`` tokens: ``input_ids = block[:-1]``, ``labels = block[1:]``.
Without validation files, about 5% of the documents (a stable hash of their text) are held out.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from typing_extensions import override

from lightning_moe.data.batching import DistributedBatchSampler, ResumableDataLoader, ShuffledBatches, replicas_of
from lightning_moe.data.corpus import CorpusError, bundled_corpus_dir, hash_split, read_corpus
from lightning_moe.data.tokenizer import Tokenizer

__all__ = ["TextDataModule", "read_text_jsonl"]


def read_text_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` strings of a JSONL (or ``.jsonl.gz``) file, one document per line.

    Raises:
        CorpusError: naming the file and line of a malformed record.
    """
    file = Path(path)
    if not file.is_file():
        raise CorpusError(f"text file {str(file)!r} does not exist")
    opener = gzip.open if file.suffix == ".gz" else open
    texts = []
    with opener(file, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{file}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise CorpusError(f"{file}:{number}: expected an object with a string {field!r} field")
            texts.append(record[field])
    return texts


class _Blocks(Dataset):
    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return max(0, (self.stream.numel() - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        block = self.stream[index * self.seq_len : (index + 1) * self.seq_len + 1]
        return {"input_ids": block[:-1], "labels": block[1:]}


class TextDataModule(LightningDataModule):
    """Next-token prediction blocks of text tokenized with a Hugging Face tokenizer.

    Batches are dicts with ``input_ids`` and ``labels``, both ``[B, seq_len]`` long tensors.

    Args:
        tokenizer: a ``tokenizer.json`` file or a model directory holding one (the model's own).
        train_files: JSONL files of documents; ``None`` uses every sentence of the bundled corpus.
        val_files: JSONL files of validation documents; ``None`` holds out ~5% of the training
            documents (by a hash of their text).
        text_field: the JSONL field holding a document's text.
        seq_len: tokens per example.
        batch_size: examples per batch (per device).
        eos_token: token appended after every document (e.g. ``"</s>"``); ``None`` appends none.
        max_documents: use only the first this many training documents (quick runs).
        num_workers: DataLoader workers.

    Raises:
        ValueError: on an invalid setting, naming it.
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        text_field: str = "text",
        seq_len: int = 256,
        batch_size: int = 8,
        eos_token: str | None = None,
        max_documents: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.train_files = train_files
        self.val_files = val_files
        self.text_field = text_field
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eos_token = eos_token
        self.max_documents = max_documents
        self.num_workers = num_workers
        self.tokenizer = Tokenizer.load(tokenizer)
        self.eos_id: int | None = None
        if eos_token is not None:
            self.eos_id = self.tokenizer.backend_tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(
                    f"eos_token={eos_token!r} is not in the tokenizer's vocabulary; pass one of its tokens"
                )
        self._datasets: dict[str, _Blocks] = {}

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce (the model's vocabulary may be larger)."""
        return self.tokenizer.vocab_size

    def _documents(self) -> dict[str, list[str]]:
        if self.train_files is None:
            splits = read_corpus(bundled_corpus_dir())
            train = sorted({text for e in splits["train"] for text in (e.src, e.tgt)})
        else:
            train = [t for f in self.train_files for t in read_text_jsonl(f, self.text_field)]
        if self.max_documents is not None:
            train = train[: self.max_documents]
        if self.val_files is not None:
            val = [t for f in self.val_files for t in read_text_jsonl(f, self.text_field)]
        else:
            val = [t for t in train if hash_split(t, 5, 0) == "validation"]
            train = [t for t in train if hash_split(t, 5, 0) != "validation"]
        if not train:
            raise CorpusError("no training documents; check train_files and text_field")
        return {"train": train, "validation": val}

    def _stream(self, texts: list[str]) -> Tensor:
        ids: list[int] = []
        for encoded in self.tokenizer.encode_batch(texts):
            ids.extend(encoded)
            if self.eos_id is not None:
                ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        for split, texts in self._documents().items():
            self._datasets[split] = _Blocks(self._stream(texts), self.seq_len)
        if len(self._datasets["train"]) == 0:
            raise ValueError(f"the training text is shorter than seq_len + 1 = {self.seq_len + 1} tokens")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._datasets[split]
        if shuffle:  # training: seeded order per epoch, whole batches per rank, resumable mid-epoch
            batches = ShuffledBatches(len(dataset), self.batch_size, seed=0)
            num_replicas, rank = replicas_of(getattr(self, "trainer", None))
            return ResumableDataLoader(
                dataset, DistributedBatchSampler(batches, num_replicas, rank), collate_fn=default_collate,
                num_workers=self.num_workers,
            )  # fmt: skip
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)
