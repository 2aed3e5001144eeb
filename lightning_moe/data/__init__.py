"""Data: bundled multilingual corpus, tokenizer, denoising noise and the multitask DataModule."""

from lightning_moe.data.batching import DistributedBatchSampler, ResumableDataLoader, ShuffledBatches
from lightning_moe.data.corpus import (
    SPLITS,
    CorpusError,
    ParallelExample,
    bundled_corpus_dir,
    hash_split,
    read_corpus,
    read_jsonl,
    read_line_aligned,
)
from lightning_moe.data.datamodule import TASK_DENOISING, TASK_TRANSLATION, MultilingualDataModule
from lightning_moe.data.languages import ISO_639_1, check_language
from lightning_moe.data.noise import masked_token_count, span_mask
from lightning_moe.data.sampling import TemperatureSampler, temperature_probabilities
from lightning_moe.data.text import TextDataModule, read_text_jsonl
from lightning_moe.data.tokenizer import PAD_ID, SPECIAL_TOKENS, Tokenizer, lang_tag

__all__ = [
    "ISO_639_1",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TASK_DENOISING",
    "TASK_TRANSLATION",
    "CorpusError",
    "DistributedBatchSampler",
    "MultilingualDataModule",
    "ParallelExample",
    "ResumableDataLoader",
    "ShuffledBatches",
    "TemperatureSampler",
    "TextDataModule",
    "Tokenizer",
    "bundled_corpus_dir",
    "check_language",
    "hash_split",
    "lang_tag",
    "masked_token_count",
    "read_corpus",
    "read_jsonl",
    "read_line_aligned",
    "read_text_jsonl",
    "span_mask",
    "temperature_probabilities",
]
