"""Reading parallel corpora from disk.

Two layouts are understood, and both may be mixed in one directory:

- line-aligned text files ``{split}.{src}-{tgt}.{lang}``, e.g. ``train.en-de.en``
  and ``train.en-de.de``, line ``i`` of one the translation of line ``i`` of the other;
- JSON Lines files ``{split}.jsonl`` (or ``{split}.jsonl.gz``), one object per line
  with string fields ``src_lang``, ``tgt_lang``, ``src``, ``tgt``.

``split`` is ``train``, ``validation`` (also spelled ``valid``, ``val`` or ``dev``)
or ``test``. Every problem with the input raises :class:`CorpusError` naming the
file and, where there is one, the line.

The bundled corpus (``lightning_moe/data/corpus/{split}.jsonl.gz``) uses the JSONL
layout; ``scripts/build_corpus.py`` rebuilds it.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lightning_moe.data.languages import check_language

__all__ = [
    "SPLITS",
    "CorpusError",
    "CorpusWarning",
    "ParallelExample",
    "bundled_corpus_dir",
    "dedupe",
    "hash_split",
    "read_corpus",
    "read_jsonl",
    "read_line_aligned",
]

#: Canonical split names, in order.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
_ALIGNED_RE = re.compile(r"^(?P<split>[A-Za-z]+)\.(?P<src>[^.\-]+)-(?P<tgt>[^.\-]+)\.(?P<lang>[^.]+)$")
_JSONL_RE = re.compile(r"^(?P<split>[A-Za-z]+)\.jsonl(?:\.gz)?$")
_JSONL_FIELDS: tuple[str, ...] = ("src_lang", "tgt_lang", "src", "tgt")


class CorpusError(ValueError):
    """A corpus file is missing, malformed or inconsistent; the message names the file and line."""


@dataclass(frozen=True)
class ParallelExample:
    """One sentence pair: ``src`` in language ``src_lang`` translates to ``tgt`` in ``tgt_lang``."""

    src_lang: str
    tgt_lang: str
    src: str
    tgt: str


def hash_split(text: str, validation_percent: int = 5, test_percent: int = 5) -> str:
    """Assign ``text`` to a split by a stable hash of its content.

    The bundled corpus is split by the English side, so one English sentence lands
    in the same split for every language and never crosses from train to test.

    Args:
        text: The key to hash (the English sentence).
        validation_percent: Percentage of keys that go to ``"validation"``.
        test_percent: Percentage of keys that go to ``"test"``.

    Returns:
        ``"train"``, ``"validation"`` or ``"test"``.
    """
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < validation_percent:
        return "validation"
    if bucket < validation_percent + test_percent:
        return "test"
    return "train"


def bundled_corpus_dir() -> Path:
    """Return the directory of the corpus that ships inside the package."""
    return Path(str(resources.files("lightning_moe.data") / "corpus"))


def _open_binary(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: cannot read corpus file ({e}); check that it exists and is intact") from e


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line of ``path``, 1-based, without the line ending."""
    data = _open_binary(path)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    for number, raw in enumerate(raw_lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(
                f"{path}:{number}: invalid UTF-8 at byte {e.start} of the line "
                f"({raw[e.start : e.start + 4]!r}); re-encode the file as UTF-8"
            ) from e
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield number, text


def read_line_aligned(
    src_path: str | Path, tgt_path: str | Path, src_lang: str, tgt_lang: str
) -> list[ParallelExample]:
    """Read two line-aligned files into sentence pairs.

    Pairs where either side is empty (after stripping whitespace) are skipped.

    Args:
        src_path: File holding the ``src_lang`` sentences, one per line.
        tgt_path: File holding the ``tgt_lang`` sentences, one per line.
        src_lang: ISO 639-1 code of ``src_path``.
        tgt_lang: ISO 639-1 code of ``tgt_path``.

    Returns:
        The pairs, in file order.

    Raises:
        CorpusError: If a file is unreadable, not UTF-8, or the two files differ in line count.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    check_language(src_lang, str(src_path))
    check_language(tgt_lang, str(tgt_path))
    src_lines = [text for _, text in _decoded_lines(src_path)]
    tgt_lines = [text for _, text in _decoded_lines(tgt_path)]
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"misaligned parallel files: {src_path} has {len(src_lines)} lines but {tgt_path} has "
            f"{len(tgt_lines)}; line i of one must translate line i of the other"
        )
    return [
        ParallelExample(src_lang, tgt_lang, s.strip(), t.strip())
        for s, t in zip(src_lines, tgt_lines, strict=True)
        if s.strip() and t.strip()
    ]


def read_jsonl(path: str | Path) -> list[ParallelExample]:
    """Read a JSON Lines corpus (optionally gzip'd) into sentence pairs.

    Each non-blank line must be an object with string fields ``src_lang``, ``tgt_lang``,
    ``src`` and ``tgt``; other fields are ignored. Pairs with an empty side are skipped.

    Args:
        path: The ``.jsonl`` or ``.jsonl.gz`` file.

    Returns:
        The pairs, in file order.

    Raises:
        CorpusError: On unreadable files, invalid UTF-8, malformed JSON, missing or
            non-string fields, or unknown language codes; the message names ``file:line``.
    """
    path = Path(path)
    examples: list[ParallelExample] = []
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one object "
                'like {"src_lang": "en", "tgt_lang": "de", "src": "...", "tgt": "..."}'
            ) from e
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected a JSON object with fields {list(_JSONL_FIELDS)}, got {record!r:.80}")
        for field in _JSONL_FIELDS:
            if not isinstance(record.get(field), str):
                raise CorpusError(
                    f"{where}: field {field!r} is missing or not a string (got {record.get(field)!r:.80}); "
                    f"every line needs string fields {list(_JSONL_FIELDS)}"
                )
        try:
            src_lang = check_language(record["src_lang"], where)
            tgt_lang = check_language(record["tgt_lang"], where)
        except ValueError as e:
            raise CorpusError(str(e)) from None
        if src_lang == tgt_lang:
            raise CorpusError(
                f"{where}: src_lang and tgt_lang are both {src_lang!r}; a translation pair needs two "
                "different languages (monolingual text is used for denoising automatically)"
            )
        src, tgt = record["src"].strip(), record["tgt"].strip()
        if src and tgt:
            examples.append(ParallelExample(src_lang, tgt_lang, src, tgt))
    return examples


class CorpusWarning(UserWarning):
    """A file in a corpus directory is named like a split file but its split name is unknown, so it is ignored."""


def _split_of(path: Path, name: str) -> str | None:
    """The canonical split of a file's split name, or None (with a :class:`CorpusWarning`) for an unknown one."""
    split = _SPLIT_ALIASES.get(name.lower())
    if split is None:
        close = difflib.get_close_matches(name.lower(), list(_SPLIT_ALIASES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.warn(
            f"{path}: {name!r} is not a split name{hint}, so this file is ignored; name it with one of "
            f"{sorted(_SPLIT_ALIASES)}",
            CorpusWarning,
            stacklevel=3,
        )
    return split


def read_corpus(data_dir: str | Path) -> dict[str, list[ParallelExample]]:
    """Read every corpus file in ``data_dir``, in either layout.

    Files whose names match neither layout are ignored; a file named like a split file whose split
    name is unknown (``validaton.jsonl``) is ignored with a :class:`CorpusWarning` that names it.
    Within a split, JSONL files come first, then line-aligned pairs sorted by name, so the order is
    deterministic.

    Args:
        data_dir: Directory holding ``{split}.jsonl[.gz]`` and/or ``{split}.{src}-{tgt}.{lang}`` files.

    Returns:
        A dict from each of :data:`SPLITS` to its (possibly empty) list of pairs.

    Raises:
        CorpusError: If the directory does not exist, a line-aligned file lacks its
            partner, a file name carries an unknown language code, or any file is malformed.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise CorpusError(f"data_dir={str(root)!r} is not a directory; pass a directory of corpus files or None")
    corpus: dict[str, list[ParallelExample]] = {split: [] for split in SPLITS}
    aligned: dict[tuple[str, str, str], dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        if match := _JSONL_RE.match(path.name):
            split = _split_of(path, match["split"])
            if split is not None:
                corpus[split].extend(read_jsonl(path))
        elif match := _ALIGNED_RE.match(path.name):
            split = _split_of(path, match["split"])
            if split is None:
                continue
            src, tgt, lang = match["src"], match["tgt"], match["lang"]
            for code in (src, tgt, lang):
                try:
                    check_language(code, str(path))
                except ValueError as e:
                    raise CorpusError(str(e)) from None
            if src == tgt:
                raise CorpusError(
                    f"{path}: the pair {src}-{tgt} has the same language on both sides; "
                    "name the files {split}.{src}-{tgt}.{lang} with two different languages"
                )
            if lang not in (src, tgt):
                raise CorpusError(
                    f"{path}: language suffix {lang!r} is neither side of the pair {src}-{tgt}; name the "
                    f"files {match['split']}.{src}-{tgt}.{src} and {match['split']}.{src}-{tgt}.{tgt}"
                )
            aligned.setdefault((split, src, tgt), {})[lang] = path
    for (split, src, tgt), files in sorted(aligned.items()):
        missing = [lang for lang in (src, tgt) if lang not in files]
        if missing:
            present = next(iter(files.values()))
            expected = present.with_name(f"{present.name.rsplit('.', 1)[0]}.{missing[0]}")
            raise CorpusError(f"{present}: its parallel partner {expected} is missing; add it or remove {present}")
        corpus[split].extend(read_line_aligned(files[src], files[tgt], src, tgt))
    return corpus


def dedupe(examples: Iterable[ParallelExample]) -> list[ParallelExample]:
    """Drop repeated pairs (same languages and texts), keeping the first occurrence."""
    seen: set[ParallelExample] = set()
    out: list[ParallelExample] = []
    for example in examples:
        if example not in seen:
            seen.add(example)
            out.append(example)
    return out
