"""Tokenizer training time and encode throughput: the tokenizers-library Tokenizer, and optionally the old one.

Trains on what MultilingualDataModule trains on (the unique sentences of the training split, every
language, ``vocab_size`` 4000 by default) and encodes every one of those sentences, cold (a fresh
tokenizer, as the datamodule's setup does), one call per sentence and, for the new tokenizer, one
``encode_batch`` call. ``--old DIR`` also times the pure-Python BPE of a checkout of commit a3d1d01
(``git worktree add /tmp/old a3d1d01``). Best of ``--repeats`` runs; the load average is printed,
since the numbers mean little on a busy machine.

Usage::

    python scripts/tokenizer_benchmark.py --old /tmp/old                               # the bundled corpus
    python scripts/build_libreoffice_corpus.py --out /tmp/lo14 --languages ar de es fr it ja ko nl pl pt ru tr uk zh
    python scripts/tokenizer_benchmark.py --old /tmp/old --corpus /tmp/lo14 --pairs 110060   # 10x the bundled
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lightning_moe.data.corpus import bundled_corpus_dir, read_corpus
from lightning_moe.data.tokenizer import Tokenizer


def _old_tokenizer_class(checkout: Path) -> type:
    spec = importlib.util.spec_from_file_location("old_tokenizer", checkout / "lightning_moe" / "data" / "tokenizer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "_learn_merges"):
        raise SystemExit(f"{checkout} does not hold the pure-Python BPE; pass a checkout of commit a3d1d01")
    return module.Tokenizer


def _best(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    """Print one table row per tokenizer and way of encoding."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the bundled corpus)")
    parser.add_argument("--pairs", type=int, default=None, help="use a seeded sample of this many training pairs")
    parser.add_argument("--old", type=Path, default=None, help="checkout of commit a3d1d01: time its tokenizer too")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    train = read_corpus(args.corpus or bundled_corpus_dir())["train"]
    if args.pairs is not None:
        train = random.Random(0).sample(train, min(args.pairs, len(train)))
    texts = sorted({t for e in train for t in (e.src, e.tgt)})
    languages = sorted({lang for e in train for lang in (e.src_lang, e.tgt_lang)})
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {args.corpus or 'bundled'}; {len(train)} pairs, {len(texts)} unique sentences, {megabytes:.2f} MB")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print("| tokenizer | train (s) | encode | encode (s) | sentences/s | MB/s | tokens |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")

    classes: dict[str, type] = {"tokenizers BPE (new)": Tokenizer}
    if args.old is not None:
        classes["pure-Python BPE (a3d1d01)"] = _old_tokenizer_class(args.old)
    for name, cls in classes.items():
        train_s, tok = _best(
            lambda cls=cls: cls.train(texts, vocab_size=args.vocab_size, languages=languages), args.repeats
        )
        ways = {"per sentence": lambda tok: [tok.encode(t) for t in texts]}
        if hasattr(tok, "encode_batch"):
            ways["encode_batch"] = lambda tok: tok.encode_batch(texts)
        for way, encode in ways.items():
            # Cold: a fresh copy each time (the old tokenizer caches words; the datamodule encodes once).
            fresh = [cls.from_dict(tok.to_dict()) for _ in range(args.repeats)]
            seconds, ids = _best(lambda encode=encode, fresh=fresh: encode(fresh.pop()), args.repeats)
            tokens = sum(len(row) for row in ids)
            print(
                f"| {name} | {train_s:.2f} | {way} | {seconds:.3f} | {len(texts) / seconds:,.0f} | "
                f"{megabytes / seconds:.2f} | {tokens:,} |"
            )
    print(f"load at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
