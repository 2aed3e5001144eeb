"""Rebuild the bundled parallel corpus from Django's gettext catalogs.

Django ships human translations of its user-facing strings (BSD-3-Clause) as
gettext ``.po`` catalogs: ``django/conf/locale/<locale>/LC_MESSAGES/django.po`` and
``django/contrib/<app>/locale/<locale>/LC_MESSAGES/django{,js}.po``. Each entry pairs
an English ``msgid`` with its translation ``msgstr``. This script turns them into
``lightning_moe/data/corpus/{train,validation,test}.jsonl.gz`` plus Django's license as
``LICENSE.django`` (English-centric,
``src_lang="en"``), split by a hash of the English sentence so that one English
sentence never appears in two splits.

Usage (not run in CI; the output is committed)::

    pip download --no-deps django==5.2.19 -d /tmp/dj
    python scripts/build_corpus.py /tmp/dj/django-5.2.19-py3-none-any.whl
    python scripts/build_corpus.py /path/to/site-packages/django    # an installed Django

Entry handling: fuzzy, obsolete and untranslated entries and the header are skipped;
plural entries pair ``msgid`` with the target form for n=1 and ``msgid_plural`` with the
form for n=5 (chosen by the catalog's ``Plural-Forms`` header); whitespace (including newlines) is
collapsed to single spaces; Python format placeholders such as ``%(name)s`` and
``{count}`` are kept, they are copied verbatim by translators; entries whose English
has no letter outside placeholders, or longer than ``--max-chars``, are dropped; exact duplicates are removed.
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import io
import json
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lightning_moe.data.corpus import SPLITS, hash_split

# ISO 639-1 code -> Django locale directory.
LANGUAGES: dict[str, str] = {
    "ar": "ar",
    "de": "de",
    "es": "es",
    "fr": "fr",
    "it": "it",
    "ja": "ja",
    "ko": "ko",
    "nl": "nl",
    "pl": "pl",
    "pt": "pt_BR",
    "ru": "ru",
    "tr": "tr",
    "uk": "uk",
    "zh": "zh_Hans",
}

_CATALOG_RE = re.compile(r"(?:^|/)django/(?:conf|contrib/[a-z_]+)/locale/([A-Za-z_@]+)/LC_MESSAGES/[a-z]+\.po$")
_PLACEHOLDER_RE = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[sdrifxXeEgGc%]|\{[^{}]*\}")
# The English plural msgid is paired with the target form used for this count.
_PLURAL_N = 5
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unquote(token: str) -> str:
    body = token.strip()
    if not (body.startswith('"') and body.endswith('"')):
        raise ValueError(f"expected a quoted string, got {token!r}")
    body = body[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def parse_po(text: str) -> list[dict[str, object]]:
    """Parse a .po catalog into entries with keys msgid, msgid_plural, msgstr (list), fuzzy, obsolete."""
    entries: list[dict[str, object]] = []
    entry: dict[str, object] = {}
    field: str | None = None

    def flush() -> None:
        nonlocal entry, field
        if "msgid" in entry:
            entries.append(entry)
        entry, field = {}, None

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#~"):
            entry["obsolete"] = True
            continue
        if line.startswith("#,"):
            if "msgid" in entry:
                flush()
            if "fuzzy" in line:
                entry["fuzzy"] = True
            continue
        if line.startswith("#"):
            if "msgid" in entry and field != "msgctxt":
                flush()
            continue
        keyword, _, rest = line.partition(" ")
        if line.startswith('"'):
            if field is None:
                raise ValueError(f"continuation line outside an entry: {raw!r}")
            value = _unquote(line)
            if field.startswith("msgstr"):
                strs: list[str] = entry["msgstr"]  # type: ignore[assignment]
                strs[-1] += value
            else:
                entry[field] = str(entry[field]) + value
            continue
        if keyword == "msgctxt":
            if "msgid" in entry:
                flush()
            field = "msgctxt"
            entry["msgctxt"] = _unquote(rest)
        elif keyword in ("msgid", "msgid_plural"):
            if keyword == "msgid" and "msgid" in entry:
                flush()
            field = keyword
            entry[keyword] = _unquote(rest)
        elif keyword == "msgstr" or keyword.startswith("msgstr["):
            field = "msgstr"
            entry.setdefault("msgstr", [])
            entry["msgstr"].append(_unquote(rest))  # type: ignore[union-attr]
        else:
            raise ValueError(f"unexpected line: {raw!r}")
    flush()
    return entries


def _plural_index(entries: list[dict[str, object]], catalog: str) -> Callable[[int], int]:
    """Return the catalog's Plural-Forms function n -> index into msgstr[]."""
    header = next((e for e in entries if e["msgid"] == ""), None)
    forms = [] if header is None else re.findall(r"Plural-Forms:.*?plural=([^;\n]+)", str(header["msgstr"][0]))  # type: ignore[index]
    if not forms:
        return lambda n: 0 if n == 1 else 1
    return gettext.c2py(forms[0])


def _clean(text: str) -> str:
    return " ".join(text.split())


def _catalogs(source: Path) -> dict[str, list[tuple[str, str]]]:
    """Return {locale: [(catalog name, catalog text), ...]} from a wheel or a Django directory."""
    found: dict[str, list[tuple[str, str]]] = {}
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            for name in sorted(wheel.namelist()):
                if match := _CATALOG_RE.search(name):
                    found.setdefault(match.group(1), []).append((name, wheel.read(name).decode("utf-8")))
    else:
        root = source.resolve()
        for path in sorted(root.rglob("*.po")):
            relative = "django/" + path.relative_to(root).as_posix()
            if match := _CATALOG_RE.search(relative):
                found.setdefault(match.group(1), []).append((relative, path.read_text("utf-8")))
    if not found:
        raise SystemExit(
            f"no Django .po catalogs found in {source}; pass the Django wheel or the installed django/ dir"
        )
    return found


def _license_text(source: Path) -> str | None:
    """Django's BSD-3 LICENSE from the wheel's or the installation's dist-info, if present."""
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            for name in sorted(wheel.namelist()):
                if re.fullmatch(r"[Dd]jango-[^/]+\.dist-info/(?:licenses/)?LICENSE", name):
                    return wheel.read(name).decode("utf-8")
        return None
    for candidate in sorted(source.resolve().parent.glob("[Dd]jango-*.dist-info/**/LICENSE")):
        return candidate.read_text("utf-8")
    return None


def build(source: Path, max_chars: int) -> dict[str, list[dict[str, str]]]:
    """Build the split corpus from Django catalogs."""
    catalogs = _catalogs(source)
    splits: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for lang, locale in sorted(LANGUAGES.items()):
        if locale not in catalogs:
            raise SystemExit(f"locale {locale!r} (for {lang!r}) not found; available: {sorted(catalogs)}")
        pairs: set[tuple[str, str]] = set()
        for name, text in catalogs[locale]:
            entries = parse_po(text)
            plural_index = _plural_index(entries, name)
            for entry in entries:
                if entry.get("fuzzy") or entry.get("obsolete") or not entry["msgid"]:
                    continue
                forms: list[str] = entry.get("msgstr") or []  # type: ignore[assignment]
                candidates = [(str(entry["msgid"]), forms[plural_index(1)] if "msgid_plural" in entry else forms[0])]
                if "msgid_plural" in entry:
                    candidates.append((str(entry["msgid_plural"]), forms[plural_index(_PLURAL_N)]))
                for english, translated in candidates:
                    english, translated = _clean(english), _clean(translated)
                    if not english or not translated or max(len(english), len(translated)) > max_chars:
                        continue
                    if not any(ch.isalpha() for ch in _PLACEHOLDER_RE.sub("", english)):
                        continue
                    pairs.add((english, translated))
        for english, translated in sorted(pairs):
            record = {"src_lang": "en", "tgt_lang": lang, "src": english, "tgt": translated}
            splits[hash_split(english)].append(record)
    return splits


def write(splits: dict[str, list[dict[str, str]]], out_dir: Path) -> None:
    """Write each split as deterministic gzip'd JSONL (mtime 0, so rebuilds are byte-identical)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
            f.write(payload)
        (out_dir / f"{split}.jsonl.gz").write_bytes(buffer.getvalue())


def stats_table(splits: dict[str, list[dict[str, str]]]) -> str:
    """Markdown table of pairs per language and split."""
    counts = {split: Counter(r["tgt_lang"] for r in records) for split, records in splits.items()}
    langs = sorted(set().union(*counts.values()))
    lines = ["| language | locale | " + " | ".join(SPLITS) + " | total |", "| --- | --- |" + " ---: |" * 4]
    for lang in langs:
        row = [counts[s][lang] for s in SPLITS]
        lines.append(f"| en-{lang} | {LANGUAGES[lang]} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    totals = [sum(counts[s].values()) for s in SPLITS]
    lines.append("| **all** | | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Django wheel (.whl) or installed django/ package directory")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "lightning_moe" / "data" / "corpus",
        help="output directory (default: the package's bundled corpus)",
    )
    parser.add_argument("--max-chars", type=int, default=400, help="drop pairs with a side longer than this")
    args = parser.parse_args(argv)
    splits = build(args.source, args.max_chars)
    write(splits, args.out)
    license_text = _license_text(args.source)
    if license_text is None:
        print("warning: Django's LICENSE not found; copy it to LICENSE.django by hand", file=sys.stderr)
    else:
        (args.out / "LICENSE.django").write_text(license_text, encoding="utf-8")
    print(stats_table(splits))
    print(f"wrote {', '.join(f'{s}.jsonl.gz' for s in SPLITS)} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
