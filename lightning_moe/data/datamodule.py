"""The multitask multilingual DataModule: translation in both directions plus denoising.

Example layout (S source length, L target length, B batch):

- translation ``de -> en``: ``src_ids = <2en> Hallo Welt </s>``,
  ``tgt_in = <2en> Hello world``, ``tgt_out = Hello world </s>``;
- denoising (German): ``src_ids = <2de> Hallo <mask> </s>``,
  ``tgt_in = <2de> Hallo Welt``, ``tgt_out = Hallo Welt </s>``.

The target-language tag opens both the source and the decoder input, so generation
starts from :meth:`MultilingualDataModule.decoder_start_id`. ``<s>`` (``bos_id``) is
reserved and not used in batches.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_moe.data.batching import DistributedBatchSampler, ResumableDataLoader, replicas_of
from lightning_moe.data.corpus import (
    CorpusError,
    ParallelExample,
    bundled_corpus_dir,
    dedupe,
    hash_split,
    read_corpus,
)
from lightning_moe.data.languages import check_language
from lightning_moe.data.noise import span_mask
from lightning_moe.data.sampling import TemperatureSampler, temperature_probabilities
from lightning_moe.data.tokenizer import PAD_ID, Tokenizer, TokenizerCheckpointMixin

__all__ = ["TASK_DENOISING", "TASK_TRANSLATION", "MultilingualDataModule"]

log = logging.getLogger(__name__)

#: Value of ``batch["task"]`` for translation examples.
TASK_TRANSLATION = 0
#: Value of ``batch["task"]`` for denoising examples.
TASK_DENOISING = 1
_PIVOT = "en"


@dataclass(frozen=True)
class _Group:
    """A set of training examples drawn together: one translation direction or one denoising language."""

    task: int
    direction: int  # index into MultilingualDataModule.directions
    src_lang: str
    tgt_lang: str
    sources: list[tuple[int, ...]]  # token ids; for denoising, the clean sentence
    targets: list[tuple[int, ...]]


def _translation_example(
    src: Sequence[int], tgt: Sequence[int], tag: int, eos: int, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    tgt = list(tgt[: max_length - 1])
    return [tag, *src[: max_length - 2], eos], [tag, *tgt], [*tgt, eos]


class _TrainDataset(Dataset):
    """Groups concatenated; indexed by ``(flat_index, seed)`` pairs from :class:`TemperatureSampler`."""

    def __init__(self, groups: list[_Group], tokenizer: Tokenizer, noise_ratio: float, max_length: int) -> None:
        self.groups = groups
        self.tokenizer = tokenizer
        self.noise_ratio = noise_ratio
        self.max_length = max_length
        self.offsets = [0]
        for group in groups:
            self.offsets.append(self.offsets[-1] + len(group.sources))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        # A plain index (from a sampler other than TemperatureSampler) seeds the noise with itself.
        flat, seed = (key, key) if isinstance(key, int) else key
        g = bisect_right(self.offsets, flat) - 1
        group, i = self.groups[g], flat - self.offsets[g]
        tok = self.tokenizer
        tag = tok.lang_token_id(group.tgt_lang)
        target = group.targets[i]
        if group.task == TASK_DENOISING:
            clean = target[: self.max_length - 1]
            source: Sequence[int] = span_mask(clean, self.noise_ratio, tok.mask_id, random.Random(seed))
        else:
            source = group.sources[i]
        src, tgt_in, tgt_out = _translation_example(source, target, tag, tok.eos_id, self.max_length)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "direction": group.direction, "task": group.task}


class _EvalDataset(Dataset):
    """Translation examples of every direction in a fixed order."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class _Collate:
    """Pad a list of examples into the batch dict (a class, so worker processes can pickle it)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def _pad(self, rows: list[list[int]]) -> Tensor:
        out_BS = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            out_BS[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out_BS

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        src_ids = self._pad([e["src"] for e in examples])
        return {
            "src_ids": src_ids,
            "src_mask": src_ids != self.pad_id,
            "tgt_in": self._pad([e["tgt_in"] for e in examples]),
            "tgt_out": self._pad([e["tgt_out"] for e in examples]),
            "direction": torch.tensor([e["direction"] for e in examples], dtype=torch.long),
            "task": torch.tensor([e["task"] for e in examples], dtype=torch.long),
        }


class MultilingualDataModule(TokenizerCheckpointMixin, LightningDataModule):
    """Multitask multilingual data: translation in both directions of every pair, plus denoising.

    Training draws ``samples_per_epoch`` examples per epoch with replacement: a
    denoising example with probability ``denoising_ratio``, else a translation
    example; the direction (or denoising language) by temperature sampling
    ``p ~ n^(1/temperature)``. Validation and test are translation only, every
    direction, in a fixed order.

    Batches are dicts of tensors (B batch, S source length, L target length):

    - ``src_ids`` [B, S] long: ``<2tgt> tokens </s>``, right-padded with ``pad_id``;
    - ``src_mask`` [B, S] bool: True on real tokens;
    - ``tgt_in`` [B, L] long: decoder input ``<2tgt> tokens``, padded with ``pad_id``;
    - ``tgt_out`` [B, L] long: labels ``tokens </s>``, padded with ``pad_id``
      (use ``ignore_index=pad_id`` in the loss);
    - ``direction`` [B] long: index into :attr:`directions`;
    - ``task`` [B] long: 0 translation, 1 denoising.

    After :meth:`setup`, :attr:`tokenizer`, :attr:`languages`, :attr:`directions` and
    :attr:`vocab_size` describe the data.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        languages: list[str] | None = None,
        vocab_size: int = 4000,
        temperature: float = 5.0,
        denoising_ratio: float = 0.5,
        noise_ratio: float = 0.35,
        max_length: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        samples_per_epoch: int = 10000,
        seed: int = 0,
        tokenizer_path: str | None = None,
        bucket_batches: int = 50,
    ) -> None:
        """Configure the data; nothing is read until :meth:`prepare_data` / :meth:`setup`.

        Args:
            data_dir: Directory of ``{split}.jsonl`` and/or ``{split}.{src}-{tgt}.{lang}`` files;
                None uses the bundled corpus (Django translations, 14 languages paired with English).
            languages: Keep only pairs whose languages are all in this list (English, the
                pivot, is always kept); None keeps all.
            vocab_size: Tokenizer vocabulary size, specials included.
            temperature: Sampling temperature over directions, ``p ~ n^(1/T)``; 1 is
                proportional to data size, larger is flatter.
            denoising_ratio: Fraction of training examples that are denoising.
            noise_ratio: Expected fraction of tokens masked in a denoising source.
            max_length: Maximum tokens of a source and of a target sequence, specials included.
            batch_size: Examples per batch (per device).
            num_workers: DataLoader worker processes.
            samples_per_epoch: Training examples drawn per epoch (over all devices).
            seed: Seed of the training draws and noise; epoch ``e`` uses ``seed + e``.
            tokenizer_path: JSON file of a saved tokenizer. If it exists it is loaded;
                otherwise the tokenizer is trained and saved there.
            bucket_batches: Length bucketing of training batches: each run of
                ``bucket_batches * batch_size`` draws is sorted by length and cut into batches
                (whose order is shuffled), which cuts padding several-fold; 0 turns it off.

        Raises:
            ValueError: If a numeric argument is out of range or a language code is unknown.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= denoising_ratio <= 1.0:
            raise ValueError(f"denoising_ratio={denoising_ratio} must be in [0, 1] (0.5 = half the examples)")
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError(f"noise_ratio={noise_ratio} must be in [0, 1] (mBART uses 0.35)")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (1 = proportional, 5 = paper default)")
        if max_length < 4:
            raise ValueError(f"max_length={max_length} must be >= 4 (a tag, a token, </s> and room to learn)")
        for name, value in (("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if bucket_batches < 0:
            raise ValueError(f"bucket_batches={bucket_batches} must be >= 0 (0 turns length bucketing off)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if languages is not None:
            for lang in languages:
                check_language(lang, "MultilingualDataModule(languages=...)")
        self.data_dir = data_dir
        self.requested_languages = None if languages is None else list(languages)
        self.requested_vocab_size = vocab_size
        self.temperature = temperature
        self.denoising_ratio = denoising_ratio
        self.noise_ratio = noise_ratio
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.tokenizer_path = tokenizer_path
        self.bucket_batches = bucket_batches

        self._tokenizer: Tokenizer | None = None
        self._splits: dict[str, list[ParallelExample]] | None = None
        self._languages: list[str] = []
        self._pairs: list[tuple[str, str]] = []
        self._directions: list[str] = []
        self._groups: list[_Group] = []
        self._eval: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ public properties

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (available after :meth:`setup`)."""
        if self._tokenizer is None:
            raise RuntimeError("the tokenizer is not ready; call datamodule.setup() (the Trainer does) first")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size for the model's embeddings.

        Known before :meth:`setup`: the size of the saved tokenizer at ``tokenizer_path``
        if there is one, else the configured ``vocab_size`` (trained tokenizers have
        exactly that size). So ``LightningCLI.link_arguments("data.vocab_size",
        "model.vocab_size", apply_on="instantiate")`` works.
        """
        if self._tokenizer is not None:
            return self._tokenizer.vocab_size
        if self.tokenizer_path is not None and Path(self.tokenizer_path).is_file():
            return Tokenizer.load(self.tokenizer_path).vocab_size
        return self.requested_vocab_size

    @property
    def pad_id(self) -> int:
        """Padding id (also the loss ``ignore_index``)."""
        return PAD_ID if self._tokenizer is None else self._tokenizer.pad_id

    @property
    def languages(self) -> list[str]:
        """Languages in the data, sorted (after :meth:`setup`)."""
        self._require_setup()
        return list(self._languages)

    @property
    def directions(self) -> list[str]:
        """Names of ``batch["direction"]`` ids: translation directions, then ``"xx-xx"`` denoising ones."""
        self._require_setup()
        return list(self._directions)

    @property
    def translation_directions(self) -> list[str]:
        """Translation directions such as ``"en-de"`` and ``"de-en"`` (a prefix of :attr:`directions`)."""
        self._require_setup()
        return list(self._directions[: 2 * len(self._pairs)])

    @property
    def sampling_probabilities(self) -> dict[str, float]:
        """Probability that a training draw comes from each direction (denoising as ``"xx-xx"``)."""
        self._require_setup()
        weights = self._group_weights()
        total = sum(weights)
        return {self._directions[g.direction]: w / total for g, w in zip(self._groups, weights, strict=True)}

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        """Train and save the tokenizer if ``tokenizer_path`` is set and does not exist yet (rank 0 only)."""
        if self.tokenizer_path is not None and not Path(self.tokenizer_path).is_file():
            self._load_corpus()
            self._train_tokenizer().save(self.tokenizer_path)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read the corpus, get the tokenizer (load, or train deterministically) and build the datasets."""
        if self._splits is None:
            self._load_corpus()
        if self._tokenizer is None:
            if self.tokenizer_path is not None and Path(self.tokenizer_path).is_file():
                self._set_tokenizer(Tokenizer.load(self.tokenizer_path))
            else:
                tokenizer = self._train_tokenizer()
                if self.tokenizer_path is not None:
                    tokenizer.save(self.tokenizer_path)
                self._set_tokenizer(tokenizer)

    @override
    def train_dataloader(self) -> DataLoader:
        """Temperature-sampled translation and denoising examples, ``samples_per_epoch`` per epoch.

        A :class:`~lightning_moe.data.batching.ResumableDataLoader`: each rank gets whole length buckets
        (:class:`~lightning_moe.data.batching.DistributedBatchSampler`), and a checkpoint records how many
        batches of the epoch were consumed, so a resumed run continues with the next one.
        """
        self._require_setup()
        dataset = _TrainDataset(self._groups, self.tokenizer, self.noise_ratio, self.max_length)
        lengths = [len(src) + len(tgt) for g in self._groups for src, tgt in zip(g.sources, g.targets, strict=True)]
        sampler = TemperatureSampler(
            [len(g.sources) for g in self._groups],
            self._group_weights(),
            self.samples_per_epoch,
            self.seed,
            lengths=lengths,
            batch_size=self.batch_size,
            bucket_batches=self.bucket_batches,
        )
        num_replicas, rank = replicas_of(getattr(self, "trainer", None))
        return ResumableDataLoader(
            dataset,
            DistributedBatchSampler(sampler, num_replicas, rank),
            collate_fn=_Collate(self.tokenizer.pad_id),
            num_workers=self.num_workers,
            seed=self.seed,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation translation examples of every direction, in a fixed order."""
        return self._loader(_EvalDataset(self._eval_examples("validation")))

    @override
    def test_dataloader(self) -> DataLoader:
        """Test translation examples of every direction, in a fixed order."""
        return self._loader(_EvalDataset(self._eval_examples("test")))

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test split's translation examples (every direction, fixed order), for ``predict``."""
        return self.test_dataloader()

    # ------------------------------------------------------------------ decoding helpers

    def val_examples(self, direction: str, n: int | None = None) -> list[tuple[str, str]]:
        """Raw ``(source_text, reference_text)`` validation pairs of ``direction``, for BLEU/chrF.

        Args:
            direction: A translation direction such as ``"de-en"``.
            n: Return at most this many: a fixed sample (seeded by ``seed``, split and direction, in corpus
                order), the same on every call and every rank; None for all.

        Raises:
            ValueError: If ``direction`` is not a translation direction of the data.
        """
        return self._raw_examples("validation", direction, n)

    def test_examples(self, direction: str, n: int | None = None) -> list[tuple[str, str]]:
        """Like :meth:`val_examples`, for the test split."""
        return self._raw_examples("test", direction, n)

    def encode_source(self, text: str, tgt_lang: str) -> list[int]:
        """Encoder input for translating ``text`` into ``tgt_lang``: ``<2tgt> tokens </s>``, truncated."""
        tok = self.tokenizer
        return [tok.lang_token_id(tgt_lang), *tok.encode(text)[: self.max_length - 2], tok.eos_id]

    def decoder_start_id(self, tgt_lang: str) -> int:
        """First decoder input token when generating ``tgt_lang`` (its language tag)."""
        return self.tokenizer.lang_token_id(tgt_lang)

    # ------------------------------------------------------------------ internals

    def _require_setup(self) -> None:
        if self._tokenizer is None or self._splits is None:
            raise RuntimeError("MultilingualDataModule is not set up; call datamodule.setup() (the Trainer does) first")

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_Collate(self.tokenizer.pad_id),
        )

    def _load_corpus(self) -> None:
        source = bundled_corpus_dir() if self.data_dir is None else Path(self.data_dir)
        splits = read_corpus(source)
        if not splits["train"]:
            raise CorpusError(
                f"no training pairs in {source}; add train.jsonl (fields src_lang, tgt_lang, src, tgt) or "
                "line-aligned train.<src>-<tgt>.<src> / train.<src>-<tgt>.<tgt> files"
            )
        canonical = {name: dedupe(_canonical(e) for e in examples) for name, examples in splits.items()}
        # Carve missing held-out splits out of train, by a stable hash of the first side.
        missing = [name for name in ("validation", "test") if not canonical[name]]
        if missing:
            log.info("%s: no %s split found; holding out ~5%% of train for each", source, " or ".join(missing))
            kept = []
            for example in canonical["train"]:
                target = hash_split(example.src)
                (canonical[target] if target in missing else kept).append(example)
            canonical["train"] = kept

        available = sorted({lang for e in canonical["train"] for lang in (e.src_lang, e.tgt_lang)})
        if self.requested_languages is not None:
            unknown = sorted(set(self.requested_languages) - set(available))
            if unknown:
                raise ValueError(
                    f"languages={self.requested_languages} includes {unknown}, which the training data of "
                    f"{source} does not have; available: {available}"
                )
            allowed = set(self.requested_languages) | {_PIVOT}
            canonical = {
                name: [e for e in examples if e.src_lang in allowed and e.tgt_lang in allowed]
                for name, examples in canonical.items()
            }
            if not canonical["train"]:
                raise ValueError(
                    f"languages={self.requested_languages} leaves no training pairs (a pair is kept when both "
                    f"its languages are listed or English); available languages: {available}"
                )
        self._splits = canonical
        self._languages = sorted({lang for e in canonical["train"] for lang in (e.src_lang, e.tgt_lang)})
        self._pairs = sorted({(e.src_lang, e.tgt_lang) for e in canonical["train"]})
        self._directions = [d for a, b in self._pairs for d in (f"{a}-{b}", f"{b}-{a}")]
        self._directions += [f"{lang}-{lang}" for lang in self._languages]

    def _train_tokenizer(self) -> Tokenizer:
        assert self._splits is not None
        texts = sorted({text for e in self._splits["train"] for text in (e.src, e.tgt)})
        return Tokenizer.train(texts, vocab_size=self.requested_vocab_size, languages=self._languages)

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Adopt ``tokenizer`` and (re)build the encoded datasets."""
        assert self._splits is not None
        missing = [lang for lang in self._languages if lang not in tokenizer.languages]
        if missing:
            raise ValueError(
                f"the tokenizer (tokenizer_path={self.tokenizer_path!r}) has no language tag for {missing}; "
                f"delete the file to retrain it on this data, or restrict `languages` to {list(tokenizer.languages)}"
            )
        if tokenizer.vocab_size != self.requested_vocab_size:
            log.warning(
                "using the loaded tokenizer's vocab_size=%d instead of the configured vocab_size=%d",
                tokenizer.vocab_size,
                self.requested_vocab_size,
            )
        self._tokenizer = tokenizer

        def encode(texts: list[str]) -> list[tuple[int, ...]]:
            return [tuple(ids) for ids in tokenizer.encode_batch(texts)]

        index = {d: i for i, d in enumerate(self._directions)}

        by_pair: dict[tuple[str, str], list[ParallelExample]] = {pair: [] for pair in self._pairs}
        for example in self._splits["train"]:
            by_pair[(example.src_lang, example.tgt_lang)].append(example)
        groups: list[_Group] = []
        for (a, b), examples in by_pair.items():
            side_a = encode([e.src for e in examples])
            side_b = encode([e.tgt for e in examples])
            groups.append(_Group(TASK_TRANSLATION, index[f"{a}-{b}"], a, b, side_a, side_b))
            groups.append(_Group(TASK_TRANSLATION, index[f"{b}-{a}"], b, a, side_b, side_a))
        for lang in self._languages:
            sentences = sorted(
                {e.src for e in self._splits["train"] if e.src_lang == lang}
                | {e.tgt for e in self._splits["train"] if e.tgt_lang == lang}
            )
            encoded = encode(sentences)
            groups.append(_Group(TASK_DENOISING, index[f"{lang}-{lang}"], lang, lang, encoded, encoded))
        self._groups = groups
        self._eval = {}

    def _group_weights(self) -> list[float]:
        translation = [g for g in self._groups if g.task == TASK_TRANSLATION]
        denoising = [g for g in self._groups if g.task == TASK_DENOISING]
        p_translation = temperature_probabilities([len(g.sources) for g in translation], self.temperature)
        p_denoising = temperature_probabilities([len(g.sources) for g in denoising], self.temperature)
        weights = {id(g): (1.0 - self.denoising_ratio) * p for g, p in zip(translation, p_translation, strict=True)}
        weights.update({id(g): self.denoising_ratio * p for g, p in zip(denoising, p_denoising, strict=True)})
        return [weights[id(g)] for g in self._groups]

    def _direction_examples(self, split: str, direction: str) -> list[tuple[str, str]]:
        assert self._splits is not None
        src_lang, _, tgt_lang = direction.partition("-")
        out: list[tuple[str, str]] = []
        for e in self._splits[split]:
            if (e.src_lang, e.tgt_lang) == (src_lang, tgt_lang):
                out.append((e.src, e.tgt))
            elif (e.tgt_lang, e.src_lang) == (src_lang, tgt_lang):
                out.append((e.tgt, e.src))
        return out

    def _raw_examples(self, split: str, direction: str, n: int | None) -> list[tuple[str, str]]:
        self._require_setup()
        if direction not in self.translation_directions:
            raise ValueError(
                f"direction={direction!r} is not a translation direction of this data; "
                f"choose one of {self.translation_directions}"
            )
        examples = self._direction_examples(split, direction)
        if n is None or n >= len(examples):
            return examples
        # A fixed, seeded sample rather than the first n: the corpus is sorted by English text, so a
        # prefix would be dominated by placeholder strings such as "%(num)d days".
        picked = sorted(random.Random(f"{self.seed}:{split}:{direction}").sample(range(len(examples)), n))
        return [examples[i] for i in picked]

    def _eval_examples(self, split: str) -> list[dict[str, Any]]:
        self._require_setup()
        if split not in self._eval:
            tok = self.tokenizer
            examples: list[dict[str, Any]] = []
            for index, direction in enumerate(self.translation_directions):
                tgt_lang = direction.partition("-")[2]
                for src_text, tgt_text in self._direction_examples(split, direction):
                    src, tgt_in, tgt_out = _translation_example(
                        tok.encode(src_text),
                        tok.encode(tgt_text),
                        tok.lang_token_id(tgt_lang),
                        tok.eos_id,
                        self.max_length,
                    )
                    examples.append(
                        {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "direction": index, "task": TASK_TRANSLATION}
                    )
            if not examples:
                where = "the bundled corpus" if self.data_dir is None else repr(self.data_dir)
                raise CorpusError(
                    f"the {split} split of {where} is empty for languages {self._languages}; add {split}.jsonl "
                    f"or {split}.<src>-<tgt>.<lang> files"
                )
            self._eval[split] = examples
        return self._eval[split]


def _canonical(example: ParallelExample) -> ParallelExample:
    """Orient a pair English-first (else alphabetical), so en-de and de-en files form one pair."""
    a, b = example.src_lang, example.tgt_lang
    if b == _PIVOT or (a != _PIVOT and b < a):
        return ParallelExample(b, a, example.tgt, example.src)
    return example
