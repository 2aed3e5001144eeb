"""The project's tokenizer: a Hugging Face ``tokenizers`` BPE with byte fallback, special and language-tag tokens.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (:attr:`Tokenizer.backend_tokenizer`) and is stored
as its ``tokenizer.json``: in checkpoints, in ``tokenizer_path`` files, and readable by every tool that
reads that format (``tokenizers``, ``transformers.PreTrainedTokenizerFast``). It is trained on the
corpus at data-preparation time (about a second for the bundled corpus) and is deterministic.

How text becomes ids (the model, pre-tokenizer and decoder in the ``tokenizer.json``):

1. *Pre-tokenization* (a ``Split`` regex) cuts text into chunks: a letter run, a digit run or a
   punctuation run, each with at most one leading space; runs of whitespace. The chunks concatenate
   back to the text exactly, so nothing is normalised away.
2. *BPE* with ``byte_fallback``: each chunk becomes characters of the learned alphabet (the most
   frequent characters, covering ``character_coverage`` of the training text), and any other
   character becomes the ids of its UTF-8 bytes (``<0xE4>`` ...): there is no unknown token and every
   string round-trips. Merges are applied in the order they were learned.

Id layout: ``<pad>=0, <s>=1, </s>=2, <unk>=3, <mask>=4``, then one language tag ``<2xx>`` per
language (sorted), then the 256 byte tokens, then the alphabet, then the merges, then ``<unused_N>``
fillers if the corpus runs out of merges, so that ``vocab_size`` is always exactly the requested
size. The specials, tags and fillers are the ``tokenizer.json``'s special added tokens.

Tokenizers of ``lightning_moe`` before 0.1 (a pure-Python BPE saved as ``{"format":
"lightning_moe.bpe", ...}``) had this same layout and rules; :meth:`Tokenizer.from_dict` and
:meth:`Tokenizer.load` convert them to an equal ``tokenizers`` BPE (the same ids for every text), so
their checkpoints load and translate as before.

:meth:`Tokenizer.load` also reads a Hugging Face model directory's ``tokenizer.json`` (with the
special tokens named in its ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from lightning_moe.data.languages import check_language

__all__ = ["PAD_ID", "SPECIAL_TOKENS", "Tokenizer", "TokenizerCheckpointMixin", "lang_tag"]

#: The fixed special tokens, in id order.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
#: Padding id of every tokenizer this project trains (``<pad>``); also the loss ``ignore_index``.
PAD_ID = 0
_ROLES = ("pad", "bos", "eos", "unk", "mask")
_NUM_BYTES = 256
_FORMAT = "tokenizers"
_LEGACY_FORMAT = "lightning_moe.bpe"
_LEGACY_VERSION = 1
_TAG_RE = re.compile(r"<2([a-z]{2})>")
_FILLER_RE = re.compile(r"<unused_\d+>")
_BYTE_RE = re.compile(r"<0x([0-9A-F]{2})>")
# Letter run | digit run | punctuation run (underscore counts as punctuation), each with an optional
# leading space; then whitespace, leaving one space for the next chunk. Oniguruma spelling of the
# previous tokenizer's Python pattern ` ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+`: Python's \w is
# letters and numbers (not combining marks) plus "_", its \s also matches \x1c-\x1f. The two agree on
# every code point that Python's Unicode database assigns (tests/test_tokenizer.py checks them all).
_SPACE = r"\s\x1c-\x1f"
_PRETOKENIZE_PATTERN = rf" ?[\p{{L}}\p{{Nl}}\p{{No}}]+| ?\p{{Nd}}+| ?(?:[^\p{{L}}\p{{N}}_{_SPACE}]|_)+|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"


def lang_tag(lang: str) -> str:
    """Return the language-tag token for ``lang``, e.g. ``"<2de>"``."""
    return f"<2{lang}>"


def _byte_token(byte: int) -> str:
    return f"<0x{byte:02X}>"


def _decoder() -> decoders.Decoder:
    """Byte tokens to bytes, then everything joined: the decoder of the project's tokenizers."""
    return decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])


def _assemble(
    languages: Sequence[str], pieces: Sequence[str], merges: Sequence[tuple[str, str]], vocab_size: int
) -> tokenizers.Tokenizer:
    """The ``tokenizers`` BPE of the id layout in the module docstring, from learned pieces and merges.

    ``pieces`` are the alphabet, then the merge results, in id order; ``merges`` are pairs of pieces,
    in learning order.
    """
    for lang in languages:
        check_language(lang, "Tokenizer languages")
    if len(set(languages)) != len(languages):
        raise ValueError(f"languages={list(languages)} has duplicates; list each language once")
    reserved = [*SPECIAL_TOKENS, *(lang_tag(lang) for lang in languages)]
    names = [*reserved, *(_byte_token(b) for b in range(_NUM_BYTES)), *pieces]
    if vocab_size < len(names):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(names)} ids this tokenizer uses; "
            f"pass vocab_size >= {len(names)}"
        )
    fillers = [f"<unused_{i}>" for i in range(vocab_size - len(names))]
    names += fillers
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(
            f"the tokenizer's pieces {duplicated[:5]} occur twice (a legacy tokenizer whose merges spell one piece "
            "two ways cannot be converted exactly); retrain the tokenizer"
        )
    model = models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>", byte_fallback=True, fuse_unk=False)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated")
    backend.decoder = _decoder()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in reserved + fillers])
    return backend


def _alphabet(texts: Sequence[str], character_coverage: float, limit: int) -> list[str]:
    """The most frequent characters until they cover ``character_coverage`` of all, at most ``limit``."""
    counts = Counter("".join(texts))
    total = sum(counts.values())
    alphabet: list[str] = []
    covered = 0
    for ch, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if (covered >= character_coverage * total and alphabet) or len(alphabet) >= limit:
            break
        alphabet.append(ch)
        covered += count
    return alphabet


def _legacy_backend(state: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Convert a ``lightning_moe.bpe`` version-1 dict (the previous pure-Python tokenizer) to its ``tokenizers`` BPE."""
    alphabet = list(state["alphabet"])
    if any(len(ch) != 1 for ch in alphabet) or len(set(alphabet)) != len(alphabet):
        raise ValueError("the legacy tokenizer's alphabet must be distinct single characters; retrain it")
    first_char_id = len(SPECIAL_TOKENS) + len(state["languages"]) + _NUM_BYTES
    pieces = list(alphabet)  # pieces[i] spells id first_char_id + i
    merges: list[tuple[str, str]] = []
    for rank, (a, b) in enumerate(state["merges"]):
        a, b = int(a) - first_char_id, int(b) - first_char_id
        if not (0 <= a < len(pieces) and 0 <= b < len(pieces)):
            raise ValueError(
                f"legacy merge {rank} ({a + first_char_id}, {b + first_char_id}) must join two earlier alphabet or "
                "merge ids; the tokenizer data is corrupt, retrain it"
            )
        merges.append((pieces[a], pieces[b]))
        pieces.append(pieces[a] + pieces[b])
    return _assemble(list(state["languages"]), pieces, merges, int(state["vocab_size"]))


def _token_name(value: Any) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers`` tokenizer with the project's special tokens and ``<2xx>`` language tags.

    Build one with :meth:`train`, :meth:`load` (a ``tokenizer.json`` file, or a Hugging Face model
    directory) or :meth:`from_dict`; :attr:`backend_tokenizer` is the ``tokenizers.Tokenizer``.

    Example::

        tok = Tokenizer.train(texts, vocab_size=4000, languages=["en", "de"])
        ids = tok.encode("Hallo Welt")
        assert tok.decode(ids) == "Hallo Welt"
        source = [tok.lang_token_id("de"), *tok.encode("Hello world"), tok.eos_id]
        tok.save("tokenizer.json")  # the Hugging Face format: tokenizers.Tokenizer.from_file reads it
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str | None] | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer``; most users call :meth:`train` or :meth:`load` instead.

        Args:
            backend: The tokenizer. It is copied; the copy encodes special-token spellings in text as
                plain text (``encode_special_tokens``).
            special_tokens: Token of each role ``"pad"``, ``"bos"``, ``"eos"``, ``"unk"``, ``"mask"``
                (``None``: the tokenizer has none); roles not given use the project's names
                (:data:`SPECIAL_TOKENS`) when the vocabulary has them.

        Raises:
            ValueError: If a role is unknown or names a token that is not in the vocabulary.
        """
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        # Text is text: "<mask>" typed by a user is spelled, never turned into the mask id.
        self._backend.encode_special_tokens = True
        given = dict(special_tokens or {})
        unknown = sorted(set(given) - set(_ROLES))
        if unknown:
            raise ValueError(f"special_tokens has unknown roles {unknown}; use {list(_ROLES)}")
        self._special_names: dict[str, str | None] = {}
        self._special_role_ids: dict[str, int | None] = {}
        for role, default in zip(_ROLES, SPECIAL_TOKENS, strict=True):
            name = given[role] if role in given else default
            token_id = None if name is None else self._backend.token_to_id(name)
            if token_id is None and role in given and name is not None:
                raise ValueError(f"special_tokens[{role!r}]={name!r} is not in the tokenizer's vocabulary")
            self._special_names[role] = name if token_id is not None else None
            self._special_role_ids[role] = token_id
        added = self._backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        tags = sorted((i, m.group(1)) for i, token in added.items() if (m := _TAG_RE.fullmatch(token.content)))
        self._lang_ids = {lang: i for i, lang in tags}
        self._languages = tuple(lang for _, lang in tags)
        # With the project's decoder (byte fallback, then fuse), decode() joins the bytes itself.
        decoder = self._backend.decoder
        self._byte_ids: dict[int, int] | None = None
        if decoder is not None and decoder.__getstate__() == _decoder().__getstate__():
            vocab = self._backend.get_vocab()
            self._byte_ids = {i: int(m.group(1), 16) for name, i in vocab.items() if (m := _BYTE_RE.fullmatch(name))}

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
        """Learn a tokenizer from ``texts`` with ``tokenizers``' BPE trainer. Deterministic.

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
        texts, languages = list(texts), list(languages)
        reserved = len(SPECIAL_TOKENS) + len(languages) + _NUM_BYTES
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for learned tokens: {len(SPECIAL_TOKENS)} specials, "
                f"{len(languages)} language tags and {_NUM_BYTES} byte tokens use {reserved} ids; "
                f"pass vocab_size > {reserved} (4000-8000 is typical)"
            )
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage={character_coverage} must be in (0, 1], e.g. 0.9995")
        budget = vocab_size - reserved
        alphabet = _alphabet(texts, character_coverage, limit=budget // 2)
        learner = tokenizers.Tokenizer(models.BPE())
        learner.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated")
        trainer = trainers.BpeTrainer(
            vocab_size=budget,
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet),  # exactly the coverage alphabet: rarer characters become bytes
        )
        learner.train_from_iterator(texts, trainer, length=len(texts))
        learned = json.loads(learner.to_str())["model"]
        pieces = sorted(learned["vocab"], key=learned["vocab"].__getitem__)
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
        return cls(_assemble(languages, pieces, merges, vocab_size))

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to content ids (no ``<s>``, ``</s>`` or language tag is added).

        Special-token spellings such as ``"<mask>"`` inside ``text`` are treated as plain
        text; build special sequences from the ``*_id`` attributes instead.

        Args:
            text: Any string.

        Returns:
            The ids; ``decode(encode(text)) == text`` for every string (with the project's tokenizers).
        """
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in one call (``tokenizers`` encodes them in parallel)."""
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Decode ids back to text.

        Args:
            ids: Token ids (a list, tuple or 1-D tensor's ``tolist()``).
            skip_special_tokens: Drop specials, language tags and fillers (default). If
                False they are rendered by name, e.g. ``"<2de>"``.

        Returns:
            The text. Byte sequences that are not valid UTF-8 (possible for model outputs) decode to
            U+FFFD, one per maximal invalid subsequence as Python's ``bytes.decode(errors="replace")``
            writes them (``tokenizers``' ``ByteFallback`` decoder would write one per byte; this is the
            rule of the previous tokenizer, so old checkpoints translate identically).

        Raises:
            ValueError: If an id is outside ``[0, vocab_size)``.
        """
        ids = [int(token) for token in ids]
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [token for token in ids if token not in self._special_ids]
        if self._byte_ids is None:
            return self._backend.decode(ids, skip_special_tokens=False)
        out = bytearray()
        for token in ids:
            byte = self._byte_ids.get(token)
            if byte is not None:
                out.append(byte)
            else:
                out += str(self._backend.id_to_token(token)).encode("utf-8")
        return out.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ vocabulary

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (as ``transformers``' fast tokenizers name it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and fillers included (the model's embedding size)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages that have a ``<2xx>`` tag token, in id order."""
        return self._languages

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens: specials, language tags, fillers (never produced by :meth:`encode`)."""
        return self._special_ids

    def _role_id(self, role: str) -> int:
        token_id = self._special_role_ids[role]
        if token_id is None:
            raise ValueError(
                f"this tokenizer has no {role} token; pass special_tokens={{{role!r}: TOKEN}} to Tokenizer.load"
            )
        return token_id

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0 in the project's tokenizers)."""
        return self._role_id("pad")

    @property
    def bos_id(self) -> int:
        """Id of ``<s>`` (1; reserved, not used in batches)."""
        return self._role_id("bos")

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (2)."""
        return self._role_id("eos")

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (3; never produced: unknown characters become byte tokens)."""
        return self._role_id("unk")

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>`` (4), the span-infilling mask of denoising."""
        return self._role_id("mask")

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
        """The token of an id: a special (``"<mask>"``), tag, byte (``"<0xE4>"``), piece or filler."""
        name = self._backend.id_to_token(int(token))
        if name is None:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return name

    # ------------------------------------------------------------------ persistence

    def to_str(self) -> str:
        """The ``tokenizer.json`` text (what :meth:`save` writes)."""
        return self._backend.to_str()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the ``tokenizer.json`` text and the special roles) that :meth:`from_dict` reads."""
        return {"format": _FORMAT, "tokenizer_json": self.to_str(), "special_tokens": dict(self._special_names)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_dict` output, or convert a previous ``lightning_moe.bpe`` dict.

        Raises:
            ValueError: If ``state`` is not a tokenizer dict of a supported version.
        """
        fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        if fmt == _FORMAT:
            return cls(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state.get("special_tokens"))
        if fmt == _LEGACY_FORMAT:
            if state.get("version") != _LEGACY_VERSION:
                raise ValueError(
                    f"tokenizer version {state.get('version')!r} is not supported (this code reads version "
                    f"{_LEGACY_VERSION}); retrain the tokenizer with this version of lightning_moe"
                )
            return cls(_legacy_backend(state))
        raise ValueError(
            f"not a lightning_moe tokenizer (expected format={_FORMAT!r}, got {fmt!r}); "
            "pass the output of Tokenizer.to_dict()"
        )

    def save(self, path: str | Path) -> None:
        """Write the ``tokenizer.json`` to ``path`` (parent directories are created; atomic)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        tmp.replace(path)  # atomic, so a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: str | Path, special_tokens: Mapping[str, str | None] | None = None) -> Tokenizer:
        """Read a ``tokenizer.json`` file, a directory holding one, or a previous ``lightning_moe.bpe`` file.

        For a directory (a Hugging Face model's), the special tokens its ``tokenizer_config.json``
        names (``pad_token``, ``bos_token``, ...) are the roles, unless ``special_tokens`` is given.

        Args:
            path: The file or directory.
            special_tokens: Token of each role, as for the constructor.

        Raises:
            FileNotFoundError: If there is no such file.
            ValueError: If the file is not a tokenizer JSON.
        """
        file = Path(path)
        roles: dict[str, str | None] = {}
        if file.is_dir():
            config = file / "tokenizer_config.json"
            if config.is_file():
                saved = json.loads(config.read_text(encoding="utf-8"))
                roles = {role: name for role in _ROLES if (name := _token_name(saved.get(f"{role}_token")))}
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer {str(file)!r} does not exist; pass a tokenizer.json file or a directory that has one"
            )
        text = file.read_text(encoding="utf-8")
        try:
            state = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not a tokenizer JSON file ({e.msg}); pass a tokenizer.json") from e
        roles.update(special_tokens or {})
        if isinstance(state, dict) and state.get("format") == _LEGACY_FORMAT:
            return cls.from_dict(state)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception for a malformed file
            raise ValueError(f"{file}: not a tokenizer.json ({e}); pass a file written by Tokenizer.save") from e
        return cls(backend, roles)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        # tokenizers pickles through its JSON, which does not keep encode_special_tokens: rebuild instead.
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state["special_tokens"])  # type: ignore[misc]

    def __repr__(self) -> str:
        model = json.loads(self._backend.to_str())["model"]
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, languages={list(self._languages)}, "
            f"model={model.get('type')}, merges={len(model.get('merges') or [])})"
        )


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
