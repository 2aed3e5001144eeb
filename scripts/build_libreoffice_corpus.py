"""Build a larger multilingual parallel corpus from LibreOffice's translations (Debian packages).

Debian's ``libreoffice-l10n-<lang>`` packages hold LibreOffice's user-interface translations as
compiled gettext catalogs (``usr/lib/libreoffice/program/resource/<locale>/LC_MESSAGES/*.mo``):
about 20,000 distinct English strings per language with their human translations, for about 100
languages. This script downloads the packages with ``apt-get download`` (or reads ``.deb`` files you
already have), reads the catalogs with no Debian tool (a ``.deb`` is an ``ar`` archive holding a
tarball) and writes ``{train,validation,test}.jsonl.gz`` in the layout the project's loaders read
(``MultilingualDataModule(data_dir=OUT)``), split by a SHA-256 hash of the English sentence as the
bundled corpus is (an English sentence lands in one split for every language), plus the packages'
copyright file as ``LICENSE.libreoffice``.

Usage::

    python scripts/build_libreoffice_corpus.py                       # default languages, default cache
    python scripts/build_libreoffice_corpus.py --out .corpus/libreoffice --languages de fr ja
    python scripts/build_libreoffice_corpus.py --debs /tmp/debs      # .deb files already downloaded

The output goes to ``$LIGHTNING_MOE_CACHE/corpora/libreoffice-<version>`` (default cache
``~/.cache/lightning_moe``) unless ``--out`` is given: it is a build product, outside the repository.

Entry handling (as ``scripts/build_corpus.py`` does for Django): the header and untranslated
entries are skipped; a plural entry gives ``msgid`` with the target form for n=1 and
``msgid_plural`` with the form for n=5 (by the catalog's ``Plural-Forms``); message contexts are
dropped; the mnemonic markers ``~``, ``_`` (a lone one, or one that starts a word) and the CJK ``(_S)``
are removed; whitespace is
collapsed; pairs whose English has no letter, whose two sides are identical, or with a side longer
than ``--max-chars`` are dropped; exact duplicates are removed.
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lightning_moe.data.corpus import SPLITS, hash_split

# ISO 639-1 code -> Debian package suffix (libreoffice-l10n-<suffix>). 28 languages, 10 scripts.
LANGUAGES: dict[str, str] = {
    "ar": "ar", "bg": "bg", "cs": "cs", "da": "da", "de": "de", "el": "el", "es": "es", "fa": "fa",
    "fi": "fi", "fr": "fr", "he": "he", "hi": "hi", "hu": "hu", "id": "id", "it": "it", "ja": "ja",
    "ko": "ko", "nl": "nl", "pl": "pl", "pt": "pt-br", "ro": "ro", "ru": "ru", "sv": "sv", "th": "th",
    "tr": "tr", "uk": "uk", "vi": "vi", "zh": "zh-cn",
}  # fmt: skip
_CATALOG_RE = re.compile(r"usr/lib/libreoffice/program/resource/[^/]+/LC_MESSAGES/[^/]+\.mo$")
_PLURAL_N = 5
_MNEMONIC_RE = re.compile(r"(?<![\w])_(?=\w)")
_CJK_MNEMONIC_RE = re.compile(r"\s*[(（]\s*[_~]\w\s*[)）]")  # "保存(_S)": the CJK way of marking one


def default_out(version: str) -> Path:
    """``$LIGHTNING_MOE_CACHE/corpora/libreoffice-<version>`` (default cache ``~/.cache/lightning_moe``)."""
    cache = Path(os.environ.get("LIGHTNING_MOE_CACHE", Path.home() / ".cache" / "lightning_moe"))
    return cache / "corpora" / f"libreoffice-{version}"


def download(languages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` the l10n package of every language into ``dest``; returns ``{lang: .deb}``."""
    dest.mkdir(parents=True, exist_ok=True)
    packages = [f"libreoffice-l10n-{LANGUAGES[lang]}" for lang in languages]
    result = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"apt-get download failed ({result.stderr.strip()[-400:]}); run it on a Debian/Ubuntu machine with "
            "package lists (`apt-get update`), or download the .deb files elsewhere and pass --debs DIR"
        )
    return find_debs(languages, dest)


def find_debs(languages: list[str], folder: Path) -> dict[str, Path]:
    """The ``libreoffice-l10n-<suffix>_*.deb`` of every language in ``folder``."""
    found = {}
    for lang in languages:
        matches = sorted(folder.glob(f"libreoffice-l10n-{LANGUAGES[lang]}_*.deb"))
        if not matches:
            raise SystemExit(f"no libreoffice-l10n-{LANGUAGES[lang]}_*.deb in {folder} (for {lang!r})")
        found[lang] = matches[-1]
    return found


def deb_version(path: Path) -> str:
    """Upstream version from a .deb name, e.g. ``7.4.7`` from ``libreoffice-l10n-de_4%3a7.4.7-1+deb12u14_all.deb``."""
    version = path.name.split("_")[1].replace("%3a", ":").split(":")[-1]
    return version.split("-")[0]


def deb_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of the regular files in a .deb's data tarball (``ar`` archive, no dpkg needed)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{path} is not a .deb (ar) archive")
    offset = 8
    while offset < len(data):
        header = data[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar:
                    if member.isfile():
                        extracted = tar.extractfile(member)
                        if extracted is not None:
                            yield member.name.lstrip("./"), extracted.read()


def parse_mo(data: bytes) -> list[tuple[str, bytes, bytes]]:
    """``(kind, msgid, msgstr)`` entries of a compiled gettext catalog (kind ``"header"`` or ``"entry"``)."""
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">"
    _, count, originals, translations = struct.unpack(endian + "4I", data[4:20])
    entries = []
    for i in range(count):
        length, start = struct.unpack(endian + "2I", data[originals + 8 * i : originals + 8 * i + 8])
        msgid = data[start : start + length]
        length, start = struct.unpack(endian + "2I", data[translations + 8 * i : translations + 8 * i + 8])
        entries.append(("header" if not msgid else "entry", msgid, data[start : start + length]))
    return entries


def _plural_function(header: bytes) -> Callable[[int], int]:
    forms = re.findall(r"Plural-Forms:.*?plural=([^;\n]+)", header.decode("utf-8", "replace"))
    return gettext.c2py(forms[0]) if forms else (lambda n: 0 if n == 1 else 1)


def clean(text: str) -> str:
    """Drop mnemonic markers (``(_S)``, ``~``, ``_``) and collapse whitespace."""
    text = _CJK_MNEMONIC_RE.sub("", text).replace("~", "")
    # One underscore before a letter is a GTK mnemonic ("Sa_ve"); several are an identifier ("FILE_NAME_X").
    text = re.sub(r"_(?=\w)", "", text) if text.count("_") == 1 else _MNEMONIC_RE.sub("", text)
    return " ".join(text.split())


def catalog_pairs(data: bytes, max_chars: int) -> set[tuple[str, str]]:
    """Cleaned ``(english, translation)`` pairs of one ``.mo`` catalog."""
    entries = parse_mo(data)
    header = next((s for kind, _, s in entries if kind == "header"), b"")
    plural = _plural_function(header)
    pairs = set()
    for kind, msgid, msgstr in entries:
        if kind != "entry" or not msgstr:
            continue
        ids = msgid.decode("utf-8").split("\x04")[-1].split("\x00")  # drop the context; singular, plural
        forms = msgstr.decode("utf-8").split("\x00")
        candidates = [(ids[0], forms[min(plural(1), len(forms) - 1)])]
        if len(ids) > 1:
            candidates.append((ids[1], forms[min(plural(_PLURAL_N), len(forms) - 1)]))
        for english, translated in candidates:
            english, translated = clean(english), clean(translated)
            if not english or not translated or english == translated:
                continue
            if max(len(english), len(translated)) > max_chars or not any(ch.isalpha() for ch in english):
                continue
            pairs.add((english, translated))
    return pairs


def build(debs: dict[str, Path], max_chars: int) -> tuple[dict[str, list[dict[str, str]]], str | None]:
    """The split corpus (and the packages' copyright text) from one .deb per language."""
    splits: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    copyright_text = None
    for lang, deb in sorted(debs.items()):
        pairs: set[tuple[str, str]] = set()
        for name, content in deb_files(deb):
            if _CATALOG_RE.search(name):
                pairs |= catalog_pairs(content, max_chars)
            elif name.endswith("/copyright") and copyright_text is None:
                copyright_text = content.decode("utf-8", "replace")
        if not pairs:
            raise SystemExit(f"{deb} holds no LibreOffice catalog (.mo under program/resource/)")
        for english, translated in sorted(pairs):
            splits[hash_split(english)].append({"src_lang": "en", "tgt_lang": lang, "src": english, "tgt": translated})
    return splits, copyright_text


def write(splits: dict[str, list[dict[str, str]]], out_dir: Path) -> None:
    """Each split as deterministic gzip'd JSONL, sorted by English then language (repeats compress well)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        ordered = sorted(records, key=lambda r: (r["src"], r["tgt_lang"], r["tgt"]))
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered).encode("utf-8")
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
            f.write(payload)
        (out_dir / f"{split}.jsonl.gz").write_bytes(buffer.getvalue())


def stats_table(splits: dict[str, list[dict[str, str]]]) -> str:
    """Markdown table of pairs per language and split."""
    counts = {split: Counter(r["tgt_lang"] for r in records) for split, records in splits.items()}
    langs = sorted(set().union(*counts.values()))
    lines = ["| language | package | " + " | ".join(SPLITS) + " | total |", "| --- | --- |" + " ---: |" * 4]
    for lang in langs:
        row = [counts[s][lang] for s in SPLITS]
        lines.append(f"| en-{lang} | {LANGUAGES[lang]} | " + " | ".join(f"{n:,}" for n in row) + f" | {sum(row):,} |")
    totals = [sum(counts[s].values()) for s in SPLITS]
    lines.append("| **all** | | " + " | ".join(f"{n:,}" for n in totals) + f" | {sum(totals):,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--languages", nargs="+", default=sorted(LANGUAGES), help="ISO 639-1 codes (default: all 28)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the cache, see above)")
    parser.add_argument("--debs", type=Path, default=None, help="folder of downloaded .deb files (default: download)")
    parser.add_argument("--max-chars", type=int, default=200, help="drop pairs with a side longer than this")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.languages) - set(LANGUAGES))
    if unknown:
        raise SystemExit(f"--languages {unknown} not supported; choose from {sorted(LANGUAGES)} (edit LANGUAGES)")
    with tempfile.TemporaryDirectory() as tmp:
        debs = find_debs(args.languages, args.debs) if args.debs else download(args.languages, Path(tmp))
        splits, copyright_text = build(debs, args.max_chars)
        version = deb_version(next(iter(debs.values())))
    out = args.out or default_out(version)
    write(splits, out)
    if copyright_text is not None:
        (out / "LICENSE.libreoffice").write_text(copyright_text, encoding="utf-8")
    print(stats_table(splits))
    size = sum((out / f"{s}.jsonl.gz").stat().st_size for s in SPLITS)
    print(f"wrote {', '.join(f'{s}.jsonl.gz' for s in SPLITS)} ({size / 2**20:.1f} MiB) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
