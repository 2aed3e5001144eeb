"""scripts/build_libreoffice_corpus.py on a hand-made .deb: .mo parsing, plurals, contexts, cleaning, splits."""

from __future__ import annotations

import importlib.util
import io
import struct
import tarfile
from pathlib import Path

from lightning_moe.data.corpus import hash_split, read_corpus

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "build_libreoffice_corpus", ROOT / "scripts" / "build_libreoffice_corpus.py"
)
assert _spec is not None and _spec.loader is not None
build_lo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_lo)


def _mo(entries: dict[bytes, bytes]) -> bytes:
    """A little-endian gettext .mo file (the GNU layout, without a hash table)."""
    keys = sorted(entries)
    n = len(keys)
    originals, translations = 28, 28 + 8 * n
    data = 28 + 16 * n
    blob, o_table, t_table = b"", b"", b""
    for key in keys:
        o_table += struct.pack("<2I", len(key), data + len(blob))
        blob += key + b"\0"
    for key in keys:
        t_table += struct.pack("<2I", len(entries[key]), data + len(blob))
        blob += entries[key] + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, originals, translations, 0, 0)
    return header + o_table + t_table + blob


def _deb(path: Path, files: dict[str, bytes]) -> None:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b""), (b"data.tar.xz", tar_bytes.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        out += str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(out)


RU_HEADER = b"Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=3; plural=(n%10==1 && n%100!=11 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);\n"


def test_catalog_pairs_plurals_contexts_and_cleaning():
    mo = _mo(
        {
            b"": RU_HEADER,
            b"STR_SAVE\x04~Save": "~Сохранить".encode(),  # context dropped, mnemonic removed
            b"%1 file\x00%1 files": "%1 файл\x00%1 файла\x00%1 файлов".encode(),  # n=1 -> form 0, n=5 -> form 2
            b"PDF": b"PDF",  # identical: dropped
            b"12345": "١٢٣٤٥".encode(),  # no letter in the English: dropped
            b"Sa_ve As": "Сохранить _как".encode(),
            b"Untranslated": b"",
        }
    )
    pairs = build_lo.catalog_pairs(mo, max_chars=200)
    assert pairs == {
        ("Save", "Сохранить"),
        ("%1 file", "%1 файл"),
        ("%1 files", "%1 файлов"),
        ("Save As", "Сохранить как"),
    }
    assert build_lo.clean("保存(_S)...") == "保存..." and build_lo.clean("FILE_NAME_X  a") == "FILE_NAME_X a"


def test_build_from_debs_writes_loadable_hash_split_corpus(tmp_path):
    english = [f"Open document number {i}" for i in range(60)]
    for lang, suffix in (("de", "de"), ("pt", "pt-br")):
        catalog = {b"": b"Plural-Forms: nplurals=2; plural=(n != 1);\n"}
        catalog.update({e.encode(): f"{lang} {e}".encode() for e in english})
        _deb(
            tmp_path / f"libreoffice-l10n-{suffix}_4%3a7.4.7-1_all.deb",
            {
                f"usr/lib/libreoffice/program/resource/{suffix}/LC_MESSAGES/sw.mo": _mo(catalog),
                f"usr/share/doc/libreoffice-l10n-{suffix}/copyright": b"License: MPL-2.0\n",
            },
        )
    debs = build_lo.find_debs(["de", "pt"], tmp_path)
    assert build_lo.deb_version(debs["pt"]) == "7.4.7"
    splits, copyright_text = build_lo.build(debs, max_chars=200)
    assert copyright_text == "License: MPL-2.0\n"
    out = tmp_path / "corpus"
    build_lo.write(splits, out)
    corpus = read_corpus(out)
    assert sum(len(v) for v in corpus.values()) == 120
    for split, examples in corpus.items():
        for example in examples:
            assert hash_split(example.src) == split  # split by the English side, for every language
            assert example.tgt == f"{example.tgt_lang} {example.src}"
    assert {e.tgt_lang for e in corpus["train"]} == {"de", "pt"}
