"""A small multilingual BPE tokenizer with byte fallback, in pure Python.

The tokenizer is trained on the corpus at data-preparation time (seconds for the
bundled corpus) and is stored as a JSON-able dict, so it can travel inside a
Lightning checkpoint.

How text becomes ids:

1. *Pre-tokenization* cuts text into chunks with a regex (a letter run, a digit run
   or a punctuation run, each with at most one leading space; runs of whitespace).
   The chunks concatenate back to the text exactly, so nothing is normalised away.
2. Each chunk becomes a sequence of characters from the learned *alphabet* (the most
   frequent characters, covering ``character_coverage`` of the training text);
   any other character becomes the ids of its UTF-8 bytes (``<0xE4>`` ...), so
   there is no unknown token and every string round-trips.
3. *BPE merges*, learned on chunk types weighted by frequency, are applied in the
   order they were learned. Encodings of chunks are cached.

Id layout: ``<pad>=0, <s>=1, </s>=2, <unk>=3, <mask>=4``, then one language tag
``<2xx>`` per language (sorted), then the 256 byte tokens, then the alphabet, then
merges, then ``<unused_N>`` fillers if the corpus runs out of merges, so that
``vocab_size`` is always exactly the requested size.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_moe.data.languages import check_language

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "TokenizerCheckpointMixin", "lang_tag"]

#: The fixed special tokens, in id order.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
_NUM_BYTES = 256
_FORMAT = "lightning_moe.bpe"
_VERSION = 1
_CACHE_LIMIT = 1 << 18
# Letter run | digit run | punctuation run (underscore counts as punctuation), each
# with an optional leading space; then whitespace, leaving one space for the next chunk.
_PRETOKENIZE_RE = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")


def lang_tag(lang: str) -> str:
    """Return the language-tag token for ``lang``, e.g. ``"<2de>"``."""
    return f"<2{lang}>"


def _pretokenize(text: str) -> list[str]:
    return _PRETOKENIZE_RE.findall(text)


class Tokenizer:
    """Byte-fallback BPE tokenizer with special and language-tag tokens.

    Build one with :meth:`train`, :meth:`from_dict` or :meth:`load`.

    Example::

        tok = Tokenizer.train(texts, vocab_size=4000, languages=["en", "de"])
        ids = tok.encode("Hallo Welt")
        assert tok.decode(ids) == "Hallo Welt"
        source = [tok.lang_token_id("de"), *tok.encode("Hello world"), tok.eos_id]
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    mask_id: int = 4

    def __init__(
        self,
        languages: Sequence[str],
        alphabet: Sequence[str],
        merges: Sequence[tuple[int, int]],
        vocab_size: int,
    ) -> None:
        """Assemble a tokenizer from its learned parts; most users call :meth:`train` instead.

        Args:
            languages: ISO 639-1 codes that get a language-tag token, in id order.
            alphabet: Single characters that are base symbols, in id order.
            merges: Learned merges as pairs of symbol ids, in learning order; merge ``i``
                creates id ``first_merge_id + i``.
            vocab_size: Total vocabulary size, at least the number of ids used above.

        Raises:
            ValueError: If a language is unknown or repeated, the alphabet has a
                non-character or duplicate, a merge refers to a later or non-mergeable
                id, or ``vocab_size`` is too small.
        """
        for lang in languages:
            check_language(lang, "Tokenizer languages")
        if len(set(languages)) != len(languages):
            raise ValueError(f"languages={list(languages)} has duplicates; list each language once")
        if any(len(ch) != 1 for ch in alphabet) or len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must be distinct single characters")
        self._languages: tuple[str, ...] = tuple(languages)
        self._alphabet: tuple[str, ...] = tuple(alphabet)
        self._merges: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in merges)

        self._lang_ids = {lang: len(SPECIAL_TOKENS) + i for i, lang in enumerate(self._languages)}
        self._first_byte_id = len(SPECIAL_TOKENS) + len(self._languages)
        self._first_char_id = self._first_byte_id + _NUM_BYTES
        first_merge_id = self._first_char_id + len(self._alphabet)
        self._num_used = first_merge_id + len(self._merges)
        if vocab_size < self._num_used:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {self._num_used} ids this tokenizer uses; "
                f"pass vocab_size >= {self._num_used}"
            )
        self._vocab_size = int(vocab_size)

        # pieces[i] is the text of content id i (None for specials, tags, bytes and fillers).
        self._pieces: list[str | None] = [None] * self._first_char_id + list(self._alphabet)
        self._char_ids = {ch: self._first_char_id + i for i, ch in enumerate(self._alphabet)}
        self._merge_ranks: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(self._merges):
            new_id = first_merge_id + rank
            if not (self._first_char_id <= a < new_id and self._first_char_id <= b < new_id):
                raise ValueError(
                    f"merge {rank} ({a}, {b}) must join two earlier alphabet or merge ids; "
                    "the tokenizer data is corrupt, retrain it"
                )
            self._pieces.append(str(self._pieces[a]) + str(self._pieces[b]))
            self._merge_ranks[(a, b)] = rank
        self._pieces.extend([None] * (self._vocab_size - self._num_used))
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4000,
        languages: Sequence[str] = (),
        character_coverage: float = 0.9995,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Learn a tokenizer from ``texts``. Deterministic: the same texts give the same tokenizer.

        Args:
            texts: Training sentences (all languages mixed). Repeats count as frequency.
            vocab_size: Exact size of the resulting vocabulary, specials included.
            languages: ISO 639-1 codes that get a ``<2xx>`` tag token (order is kept).
            character_coverage: Fraction of character occurrences the alphabet must cover;
                rarer characters are spelled with byte tokens.
            min_frequency: Stop merging when the best pair occurs fewer times than this
                (remaining ids become ``<unused_N>``).

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: If ``vocab_size`` leaves no room beyond specials, tags and bytes,
                or ``character_coverage`` is not in (0, 1].
        """
        languages = list(languages)
        reserved = len(SPECIAL_TOKENS) + len(languages) + _NUM_BYTES
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for learned tokens: {len(SPECIAL_TOKENS)} specials, "
                f"{len(languages)} language tags and {_NUM_BYTES} byte tokens use {reserved} ids; "
                f"pass vocab_size > {reserved} (4000-8000 is typical)"
            )
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage={character_coverage} must be in (0, 1], e.g. 0.9995")

        word_counts: Counter[str] = Counter()
        for text in texts:
            word_counts.update(_pretokenize(text))
        char_counts: Counter[str] = Counter()
        for word, count in word_counts.items():
            for ch in word:
                char_counts[ch] += count

        # The alphabet: most frequent characters up to the coverage, at most half the learned budget.
        budget = vocab_size - reserved
        total_chars = sum(char_counts.values())
        alphabet: list[str] = []
        covered = 0
        for ch, count in sorted(char_counts.items(), key=lambda item: (-item[1], item[0])):
            if (covered >= character_coverage * total_chars and alphabet) or len(alphabet) >= budget // 2:
                break
            alphabet.append(ch)
            covered += count

        base = cls(languages, alphabet, [], vocab_size)
        merges = _learn_merges(
            words=[base._base_symbols(w) for w in word_counts],
            counts=list(word_counts.values()),
            first_mergeable=base._first_char_id,
            first_new_id=base._num_used,
            num_merges=budget - len(alphabet),
            min_frequency=min_frequency,
        )
        return cls(languages, alphabet, merges, vocab_size)

    # ------------------------------------------------------------------ encoding

    def _base_symbols(self, word: str) -> list[int]:
        ids: list[int] = []
        for ch in word:
            char_id = self._char_ids.get(ch)
            if char_id is not None:
                ids.append(char_id)
            else:
                ids.extend(self._first_byte_id + b for b in ch.encode("utf-8"))
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = self._base_symbols(word)
        ranks = self._merge_ranks
        first_merge_id = self._first_char_id + len(self._alphabet)
        while len(ids) > 1:
            best_rank, best_at = None, -1
            for i in range(len(ids) - 1):
                rank = ranks.get((ids[i], ids[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_at = rank, i
            if best_rank is None:
                break
            pair, new_id = (ids[best_at], ids[best_at + 1]), first_merge_id + best_rank
            merged: list[int] = []
            i = 0
            while i < len(ids):
                if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        result = tuple(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to content ids (no ``<s>``, ``</s>`` or language tag is added).

        Special-token spellings such as ``"<mask>"`` inside ``text`` are treated as plain
        text; build special sequences from the ``*_id`` attributes instead.

        Args:
            text: Any string.

        Returns:
            The ids; ``decode(encode(text)) == text`` for every string.
        """
        ids: list[int] = []
        for word in _pretokenize(text):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Decode ids back to text.

        Args:
            ids: Token ids (a list, tuple or 1-D tensor's ``tolist()``).
            skip_special_tokens: Drop specials, language tags and fillers (default). If
                False they are rendered by name, e.g. ``"<2de>"``.

        Returns:
            The text. Byte sequences that are not valid UTF-8 (possible for model
            outputs) decode to U+FFFD.

        Raises:
            ValueError: If an id is outside ``[0, vocab_size)``.
        """
        out = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self._vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self._vocab_size})")
            piece = self._pieces[token]
            if piece is not None:
                out += piece.encode("utf-8")
            elif self._first_byte_id <= token < self._first_char_id:
                out.append(token - self._first_byte_id)
            elif not skip_special_tokens:
                out += self.id_to_token(token).encode("utf-8")
        return out.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and fillers included (the model's embedding size)."""
        return self._vocab_size

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages that have a tag token, in id order."""
        return self._languages

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens and language tags (never produced by :meth:`encode`)."""
        return frozenset(range(self._first_byte_id))

    def lang_token_id(self, lang: str) -> int:
        """Return the id of the ``<2xx>`` tag of ``lang``.

        Raises:
            ValueError: If the tokenizer has no tag for ``lang``.
        """
        try:
            return self._lang_ids[lang]
        except KeyError:
            raise ValueError(
                f"no language tag for {lang!r}; this tokenizer knows {list(self._languages)}. "
                "Retrain it with that language in `languages`."
            ) from None

    def id_to_token(self, token: int) -> str:
        """Human-readable name of an id: a special (``"<mask>"``), tag, byte (``"<0xE4>"``) or piece."""
        if token < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token]
        if token < self._first_byte_id:
            return lang_tag(self._languages[token - len(SPECIAL_TOKENS)])
        if token < self._first_char_id:
            return f"<0x{token - self._first_byte_id:02X}>"
        piece = self._pieces[token]
        return piece if piece is not None else f"<unused_{token - self._num_used}>"

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_dict` turns back into an equal tokenizer."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "vocab_size": self._vocab_size,
            "languages": list(self._languages),
            "alphabet": "".join(self._alphabet),
            "merges": [list(m) for m in self._merges],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output.

        Raises:
            ValueError: If ``state`` is not a tokenizer dict of a supported version.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(
                f"not a lightning_moe tokenizer (expected format={_FORMAT!r}, got "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}); "
                "pass the output of Tokenizer.to_dict()"
            )
        if state.get("version") != _VERSION:
            raise ValueError(
                f"tokenizer version {state.get('version')!r} is not supported (this code reads version "
                f"{_VERSION}); retrain the tokenizer with this version of lightning_moe"
            )
        return cls(state["languages"], list(state["alphabet"]), state["merges"], state["vocab_size"])

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to ``path`` as JSON (parent directories are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)  # atomic, so a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not a tokenizer JSON.
        """
        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not a tokenizer JSON file ({e.msg}); pass a file written by Tokenizer.save"
            ) from e
        return cls.from_dict(state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, languages={list(self._languages)}, "
            f"alphabet={len(self._alphabet)}, merges={len(self._merges)})"
        )


def _learn_merges(
    words: list[list[int]],
    counts: list[int],
    first_mergeable: int,
    first_new_id: int,
    num_merges: int,
    min_frequency: int,
) -> list[tuple[int, int]]:
    """Classic BPE on word types, with incremental pair counts and a lazy max-heap.

    Ids below ``first_mergeable`` (byte tokens) never take part in a merge. Ties are
    broken by the smaller pair, so training is deterministic.
    """
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}

    def pairs_of(word: list[int]) -> Iterable[tuple[int, int]]:
        for a, b in itertools.pairwise(word):
            if a >= first_mergeable and b >= first_mergeable:
                yield a, b

    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairs_of(word):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while heap and len(merges) < num_merges:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale heap entry
        if -neg_count < min_frequency:
            break
        new_id = first_new_id + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for index in sorted(where.pop(pair, ())):
            word, count = words[index], counts[index]
            for old in pairs_of(word):
                pair_counts[old] -= count
                changed.add(old)
            merged: list[int] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == pair[0] and word[i + 1] == pair[1]:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[index] = merged
            for new in pairs_of(merged):
                pair_counts[new] += count
                where.setdefault(new, set()).add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for changed_pair in changed:
            count = pair_counts.get(changed_pair, 0)
            if count > 0:
                heapq.heappush(heap, (-count, changed_pair))
            else:
                pair_counts.pop(changed_pair, None)
    return merges


class TokenizerCheckpointMixin:
    """Datamodule checkpoint state: the tokenizer (``self._tokenizer``), so a resumed run uses the same vocabulary.

    Subclasses implement :meth:`_set_tokenizer`, which installs a restored tokenizer and rebuilds
    whatever was encoded with the previous one. Put the mixin before ``LightningDataModule`` in the
    bases.
    """

    _tokenizer: Tokenizer | None

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the tokenizer."""
        return {"tokenizer": None if self._tokenizer is None else self._tokenizer.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the tokenizer from a checkpoint (re-encoding the data if it differs)."""
        if state_dict.get("tokenizer") is not None:
            tokenizer = Tokenizer.from_dict(state_dict["tokenizer"])
            if tokenizer != self._tokenizer:
                self._set_tokenizer(tokenizer)

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        raise NotImplementedError
