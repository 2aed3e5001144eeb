"""Write tests/data/legacy_bpe_translation.ckpt and its expected outputs with the code of commit a3d1d01.

a3d1d01 is the last commit with the pure-Python BPE tokenizer (``{"format": "lightning_moe.bpe"}``
in checkpoints). The checkpoint is a tiny MultitaskTranslationModule (en, de, ja; d_model 32, one
MoE layer) trained for 800 steps, weights only (no optimizer state), with the datamodule's state. The
expected file holds, computed by that old code, the encodings of the sentences of
tests/test_tokenizer.py's legacy test, the decodings of random id sequences (byte runs that are not
UTF-8 included) and the translations (greedy and beam 4) of validation sentences.

It also writes legacy_bpe_bundled.json: the tokenizer the old code trains for recipes/m3_tiny.yaml
(the whole bundled corpus, vocab 4000; every old m3_tiny checkpoint carries exactly this one) and the
SHA-256 of its encodings of every sentence of the bundled corpus.

Not run by the tests; run it again only to remake the files::

    git worktree add /tmp/old a3d1d01
    PYTHONPATH=/tmp/old python tests/data/make_legacy_translation_ckpt.py tests/data
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

import lightning_moe.data.tokenizer as tokenizer_module
from lightning_moe.data import MultilingualDataModule, Tokenizer
from lightning_moe.data.corpus import bundled_corpus_dir, read_corpus
from lightning_moe.modules import MultitaskTranslationModule

ODD_TEXTS = [
    "",
    " ",
    "  two  spaces\tand\ttabs\n",
    "emoji 🤖🚀 and ǅ",
    "e\u0301 combining",
    "<mask> <2de> </s>",
    "a_b 123 ²½ Ⅻ ٣",
    "x\x1cy \x1d z",
    "Ünïcödé ÆØÅ 你确定要删除吗 Вы уверены؟ 한국어",
]


def main(out_dir: Path) -> None:
    """Train, save and record; ``out_dir`` gets ``legacy_bpe_translation.ckpt`` and ``..._expected.json``."""
    assert hasattr(tokenizer_module, "_learn_merges"), (
        f"{tokenizer_module.__file__} is not the pure-Python BPE: run with PYTHONPATH pointing at a checkout of a3d1d01"
    )
    torch.set_num_threads(1)  # the test translates with one thread too: the same float sums
    L.seed_everything(0)
    data = MultilingualDataModule(
        languages=["de", "ja"], vocab_size=1200, max_length=32, batch_size=16, samples_per_epoch=960, seed=0
    )
    module = MultitaskTranslationModule(
        d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, max_positions=64,
        moe_every=2, num_experts=4, top_k=2, expert_ffn_size=32, moe_backend="torch", lr=5e-3, warmup_steps=50,
        num_eval_examples=0, eval_max_length=24, beam_size=4,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", max_steps=800, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    ckpt = out_dir / "legacy_bpe_translation.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)

    tok = data.tokenizer
    splits = read_corpus(bundled_corpus_dir())
    sentences = sorted(
        {t for s in ("train", "validation") for e in splits[s] if e.tgt_lang in ("de", "ja") for t in (e.src, e.tgt)}
    )
    sentences = random.Random(0).sample(sentences, 200) + ODD_TEXTS
    rng = random.Random(1)
    id_runs = [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 10))] for _ in range(300)]
    first_byte = 5 + len(tok.languages)
    id_runs += [[first_byte + 0xE4, first_byte + 0xB8], [first_byte + 0xE4, 300, first_byte + 0xAD, first_byte + 0x41]]
    loaded = MultitaskTranslationModule.from_checkpoint(ckpt)
    sources = random.Random(2).sample([e.src for e in splits["validation"] if e.tgt_lang in ("de", "ja")], 16)
    translations = {
        f"{lang}/beam{beam}": loaded.translate(sources, lang, beam_size=beam)
        for lang in ("de", "ja", "en")
        for beam in (1, 4)
    }
    expected = {
        "commit": "a3d1d01",
        "torch": torch.__version__,
        "encode": {text: tok.encode(text) for text in sentences},
        "decode": [[ids, tok.decode(ids), tok.decode(ids, skip_special_tokens=False)] for ids in id_runs],
        "sources": sources,
        "translations": translations,
    }
    (out_dir / "legacy_bpe_translation_expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=0))
    bundled = sorted({t for split in splits.values() for e in split for t in (e.src, e.tgt)})
    recipe_tokenizer = Tokenizer.train(
        sorted({t for e in splits["train"] for t in (e.src, e.tgt)}),
        vocab_size=4000,
        languages=sorted({lang for e in splits["train"] for lang in (e.src_lang, e.tgt_lang)}),
    )
    encodings = json.dumps([recipe_tokenizer.encode(t) for t in bundled]).encode()
    (out_dir / "legacy_bpe_bundled.json").write_text(
        json.dumps(
            {
                "commit": "a3d1d01",
                "tokenizer": recipe_tokenizer.to_dict(),
                "sentences": len(bundled),
                "sha256_of_encodings": hashlib.sha256(encodings).hexdigest(),
            },
            ensure_ascii=False,
        )
    )
    print(f"wrote {ckpt} ({ckpt.stat().st_size} bytes); translations: {translations['de/beam4'][:3]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
