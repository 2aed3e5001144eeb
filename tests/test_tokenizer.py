"""The tokenizers-library Tokenizer: old (pure-Python BPE) checkpoints translate identically, interop, HF dirs.

The legacy files in tests/data were written by the code of commit a3d1d01 (the last one with the
pure-Python BPE) with tests/data/make_legacy_translation_ckpt.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tokenizers
import torch

from lightning_moe.cli import main as cli_main
from lightning_moe.data import MultilingualDataModule, Tokenizer
from lightning_moe.data.corpus import bundled_corpus_dir, read_corpus
from lightning_moe.modules import MultitaskTranslationModule
from lightning_moe.modules.tokenizer_state import tokenizer_from_state

DATA = Path(__file__).resolve().parent / "data"
LEGACY_CKPT = DATA / "legacy_bpe_translation.ckpt"
# The previous tokenizer's pre-tokenizer, in Python's re: the specification the new Split regex must meet.
PYTHON_PRETOKENIZE = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((DATA / "legacy_bpe_translation_expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def one_thread():
    # The expected translations were decoded with one thread: the same float sums, the same beams.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_legacy_checkpoint_translates_identically(expected, one_thread) -> None:
    module = MultitaskTranslationModule.from_checkpoint(LEGACY_CKPT)
    assert isinstance(module.tokenizer, Tokenizer) and module.tokenizer.languages == ("de", "en", "ja")
    for key, outputs in expected["translations"].items():
        lang, beam = key.split("/beam")
        assert module.translate(expected["sources"], lang, beam_size=int(beam)) == outputs, key


def test_legacy_checkpoint_translates_identically_through_the_cli(expected, one_thread, capsys) -> None:
    sources = expected["sources"][:6]
    with pytest.raises(SystemExit) as exit_:
        cli_main(["translate", "--ckpt", str(LEGACY_CKPT), "--tgt-lang", "ja", *sources])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.splitlines() == expected["translations"]["ja/beam4"][:6]


def test_legacy_tokenizer_encodes_and_decodes_identically(expected) -> None:
    checkpoint = torch.load(LEGACY_CKPT, map_location="cpu", weights_only=True)
    saved = checkpoint["lightning_moe"]["tokenizer"]
    assert saved["state"]["format"] == "lightning_moe.bpe"  # really the old format
    tok = tokenizer_from_state(saved)
    texts = list(expected["encode"])
    assert [tok.encode(t) for t in texts] == list(expected["encode"].values())
    assert tok.encode_batch(texts) == list(expected["encode"].values())
    for ids, text, with_specials in expected["decode"]:
        assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=False) == with_specials, ids
    # The datamodule's saved state (a resumed run) converts to the same tokenizer.
    data = MultilingualDataModule(languages=["de", "ja"], vocab_size=1200)
    data._load_corpus()
    data.load_state_dict(checkpoint["MultilingualDataModule"])
    assert data.tokenizer == tok


def test_validate_with_a_legacy_checkpoint_adopts_its_tokenizer(tmp_path) -> None:
    """A datamodule trains today's tokenizer (other merges); the old checkpoint's wins, in module and data."""
    import lightning as L

    data = MultilingualDataModule(languages=["de", "ja"], vocab_size=1200, max_length=32, batch_size=64)
    module = MultitaskTranslationModule(
        d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, max_positions=64,
        moe_every=2, num_experts=4, top_k=2, expert_ffn_size=32, moe_backend="torch", num_eval_examples=0,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, default_root_dir=tmp_path,
    )  # fmt: skip
    (metrics,) = trainer.validate(module, datamodule=data, ckpt_path=str(LEGACY_CKPT), verbose=False)
    legacy = tokenizer_from_state(torch.load(LEGACY_CKPT, weights_only=True)["lightning_moe"]["tokenizer"])
    assert module.tokenizer == data.tokenizer == legacy
    assert Tokenizer.train(["x"], vocab_size=400) != legacy and 0 < metrics["val/loss"] < 10


def test_legacy_recipe_tokenizer_gives_the_same_ids_on_the_whole_bundled_corpus(tmp_path) -> None:
    legacy = json.loads((DATA / "legacy_bpe_bundled.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_dict(legacy["tokenizer"])
    splits = read_corpus(bundled_corpus_dir())
    sentences = sorted({t for split in splits.values() for e in split for t in (e.src, e.tgt)})
    assert len(sentences) == legacy["sentences"]
    digest = hashlib.sha256(json.dumps(tok.encode_batch(sentences)).encode()).hexdigest()
    assert digest == legacy["sha256_of_encodings"]
    # An old tokenizer_path file loads too, converted.
    (tmp_path / "old.json").write_text(json.dumps(legacy["tokenizer"]), encoding="utf-8")
    assert Tokenizer.load(tmp_path / "old.json") == tok


def test_pretokenizer_splits_every_assigned_code_point_as_python_re_did() -> None:
    split = Tokenizer.train(["ab"], vocab_size=400).backend_tokenizer.pre_tokenizer
    # Code points Python's Unicode database leaves unassigned (Cn) may be assigned in Oniguruma's newer one.
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    for start in range(0, len(chars), 40000):
        text = "".join(f"a{c}1{c}.{c} {c}  {c}\n" for c in chars[start : start + 40000])
        assert [chunk for chunk, _ in split.pre_tokenize_str(text)] == PYTHON_PRETOKENIZE.findall(text)


def test_legacy_conversion_refuses_a_piece_spelled_twice() -> None:
    first = 5 + 1 + 256  # specials, one tag, bytes: "a" = first, "b" = first + 1
    merges = [[first, first + 1], [first, first], [first, first + 2], [first + 3, first + 1]]  # ab, aa, aab, aab
    state = {"format": "lightning_moe.bpe", "version": 1, "vocab_size": 400, "languages": ["en"], "alphabet": "ab"}
    with pytest.raises(ValueError, match=r"\['aab'\] occur twice.*retrain"):
        Tokenizer.from_dict({**state, "merges": merges})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        Tokenizer.from_dict({**state, "version": 2, "merges": []})


def test_tokenizer_json_is_read_by_tokenizers_and_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    texts = ["Hello world", "Hallo Welt", "Grüße aus Köln 123", "你确定要删除吗", "Вы уверены?"]
    tok = Tokenizer.train(texts * 3, vocab_size=400, languages=["de", "en"])
    tok.save(tmp_path / "tokenizer.json")
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [*texts, "unseen ☃ text"]:
        ids = tok.encode(text)
        assert plain.encode(text, add_special_tokens=False).ids == ids == fast.encode(text, add_special_tokens=False)
        assert fast.decode(ids) == tok.decode(ids) == text
    assert Tokenizer.load(tmp_path) == tok == Tokenizer.load(tmp_path / "tokenizer.json")
    # Special-token spellings in text stay text (tokenizers would match them by default).
    assert tok.decode(tok.encode("<2de> <mask>")) == "<2de> <mask>"
    assert not tok.special_ids & set(tok.encode("<2de> <mask>"))


def test_loads_a_hugging_face_model_directory(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "[PAD]", "[BOS]", "[EOS]"])
    backend.train_from_iterator(["hello world", "mixture of experts", "hello experts"], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == tuple(
        fast.convert_tokens_to_ids(["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    )
    assert tok.languages == () and tok.vocab_size == len(fast)
    text = "hello mixture of experts world"
    assert tok.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)) == fast.decode(fast(text)["input_ids"], skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"no mask token; pass special_tokens=\{'mask': TOKEN\}"):
        _ = tok.mask_id
    assert Tokenizer.load(tmp_path, special_tokens={"mask": "[UNK]"}).mask_id == tok.unk_id
    with pytest.raises(ValueError, match=r"special_tokens\['pad'\]='<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer.load(tmp_path, special_tokens={"pad": "<nope>"})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path / "missing")


def test_pickle_keeps_special_spellings_as_text() -> None:
    tok = Tokenizer.train(["ab ab <mask>"], vocab_size=400, languages=["en"])
    again = pickle.loads(pickle.dumps(tok))
    assert again == tok and again.encode("<mask>") == tok.encode("<mask>") != [tok.mask_id]


_TRAIN_IN_A_SUBPROCESS = """
import hashlib, json, sys
from lightning_moe.data import Tokenizer
texts = json.loads(sys.stdin.read())
print(hashlib.sha256(Tokenizer.train(texts, vocab_size=900, languages=["de", "ja"]).to_str().encode()).hexdigest())
"""


def test_training_is_deterministic_across_processes_and_thread_counts() -> None:
    splits = read_corpus(bundled_corpus_dir())
    texts = sorted({e.tgt for e in splits["train"] if e.tgt_lang in ("de", "ja")})
    here = hashlib.sha256(Tokenizer.train(texts, vocab_size=900, languages=["de", "ja"]).to_str().encode())
    env = {**os.environ, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_IN_A_SUBPROCESS], input=json.dumps(texts[::-1]), env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert run.stdout.strip() == here.hexdigest()
