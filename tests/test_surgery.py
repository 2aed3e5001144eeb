"""Expert pruning and expert aggregation on real (tiny, briefly trained) translation checkpoints."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_moe.cli import main
from lightning_moe.data import MultilingualDataModule
from lightning_moe.modules import MultitaskTranslationModule
from lightning_moe.surgery import (
    SurgeryError,
    aggregate_checkpoints,
    aggregate_experts,
    load_checkpoint_dict,
    prune_checkpoint,
    prune_experts,
    select_experts,
    translation_usage,
)
from lightning_moe.surgery.checkpoints import num_experts_of
from lightning_moe.surgery.usage import translation_batches, translation_examples

E = 8
TINY = {
    "d_model": 32, "n_heads": 4, "d_ff": 48, "num_experts": E, "top_k": 2, "moe_backend": "torch", "dropout": 0.0,
    "n_encoder_layers": 2, "n_decoder_layers": 2, "max_positions": 64, "capacity_factor": 1.0,
    "eval_capacity_factor": None, "lr": 3e-3, "warmup_steps": 1, "num_eval_examples": 0,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0, "limit_val_batches": 0,
    }  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def _datamodule(tmp_path_factory) -> MultilingualDataModule:
    return MultilingualDataModule(
        languages=["de"], vocab_size=300, batch_size=8, samples_per_epoch=32, max_length=24,
        tokenizer_path=str(tmp_path_factory.getbasetemp() / "surgery_tok.json"),
    )  # fmt: skip


def _train(tmp_path, tmp_path_factory, seed: int, name: str, **overrides):
    L.seed_everything(seed)
    module = MultitaskTranslationModule(**{**TINY, **overrides})
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(module, _datamodule(tmp_path_factory))
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    return _train(tmp, tmp_path_factory, 0, "a.ckpt")


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_b")
    return _train(tmp, tmp_path_factory, 1, "b.ckpt")


def _logits(module, batches) -> list[torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return [module(b["src_ids"], b["tgt_in"]) for b in batches]


def _val_batches(module, direction=None, n=None):
    examples = translation_examples(None, "validation", direction, ["de", "en"])[:n]
    return translation_batches(module.tokenizer, examples, 64, batch_size=16)


# ----------------------------------------------------------------------------- pruning


def test_prune_keep_all_reproduces_outputs_exactly(ckpt, tmp_path):
    out = tmp_path / "all.ckpt"
    pruned, usage = prune_experts(ckpt, keep=E, out=out)
    assert pruned["lightning_moe_surgery"][-1]["kept"] == {name: list(range(E)) for name in usage}
    original = MultitaskTranslationModule.from_checkpoint(ckpt)
    restored = MultitaskTranslationModule.from_checkpoint(out)
    batches = _val_batches(original, n=64)
    for a, b in zip(_logits(original, batches), _logits(restored, batches), strict=True):
        assert torch.equal(a, b)
    assert restored.translate(["Save changes"], "de", beam_size=2, max_length=6) == original.translate(
        ["Save changes"], "de", beam_size=2, max_length=6
    )


def test_usage_counts_every_routed_assignment_and_directions_add_up(ckpt):
    module = MultitaskTranslationModule.from_checkpoint(ckpt)
    usage = translation_usage(module)
    per_direction = [translation_usage(module, direction=d) for d in ("en-de", "de-en")]
    examples = translation_examples(None, "validation", languages=["de", "en"])
    tok = module.tokenizer
    batches = translation_batches(tok, examples, 64)
    src_tokens = sum(int((b["src_ids"] != tok.pad_id).sum()) for b in batches)
    tgt_tokens = sum(int((b["tgt_in"] != tok.pad_id).sum()) for b in batches)
    assert len(usage) == 2  # one MoE layer in the encoder, one in the decoder (moe_every=2, 2 layers each)
    for name, counts in usage.items():
        tokens = src_tokens if ".encoder." in name else tgt_tokens
        assert float(counts.sum()) == 2 * tokens  # top-2: two assignments per non-padding token
        # Dropless routing of a token does not depend on its batch, so the directions' counts add up exactly.
        assert torch.equal(counts, per_direction[0][name] + per_direction[1][name])
    assert not torch.equal(per_direction[0][next(iter(usage))], per_direction[1][next(iter(usage))])


def test_pruning_experts_no_token_selects_leaves_outputs_unchanged(ckpt, tmp_path):
    # A tiny dataset leaves some experts unselected; top-2 weights are renormalised over the chosen
    # experts and evaluation is dropless, so removing the unselected experts changes no output.
    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "Ja", "tgt": "Ok"}) + "\n")
    module = MultitaskTranslationModule.from_checkpoint(ckpt)
    usage = translation_usage(module, data, direction="en-de")  # at most 2 x 3 encoder, 2 x 2 decoder choices
    used = {name: int((counts > 0).sum()) for name, counts in usage.items()}
    keep = max(max(used.values()), 2)
    assert keep < E, used
    pruned, _ = prune_experts(ckpt, keep=keep, out=tmp_path / "pruned.ckpt", data=data, direction="en-de")
    for name, kept in pruned["lightning_moe_surgery"][-1]["kept"].items():
        assert set(torch.nonzero(usage[name]).flatten().tolist()) <= set(kept)
    small = MultitaskTranslationModule.from_checkpoint(tmp_path / "pruned.ckpt")
    assert small.model.config.num_experts == keep
    assert all(m.router.weight.shape[0] == keep for m in small.model.moe_layers())
    batches = translation_batches(module.tokenizer, translation_examples(data, direction="en-de"), 64)
    for a, b in zip(_logits(module, batches), _logits(small, batches), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Negative control: dropping the most-used expert of every layer does change the outputs.
    kept_wrong = {n: sorted(set(range(E)) - {int(c.argmax())})[:keep] for n, c in usage.items()}
    checkpoint = prune_checkpoint(load_checkpoint_dict(ckpt), kept_wrong)
    wrong = MultitaskTranslationModule(**checkpoint["hyper_parameters"])
    wrong.attach_tokenizer(module.tokenizer, module.directions)
    wrong.load_state_dict(checkpoint["state_dict"])
    assert not torch.allclose(_logits(module, batches)[0], _logits(wrong, batches)[0], atol=1e-3)


def test_prune_per_direction_and_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "de-en.ckpt"
    usage_json = tmp_path / "usage.json"
    args = ["prune", "--ckpt", str(ckpt), "--keep", "4", "--out", str(out), "--per-direction", "de-en"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--usage-json", str(usage_json)])
    assert exit_info.value.code == 0
    assert "8 -> 4 experts" in capsys.readouterr().out
    module = MultitaskTranslationModule.from_checkpoint(ckpt)
    expected = select_experts(translation_usage(module, direction="de-en"), 4)
    saved = load_checkpoint_dict(out)
    assert saved["lightning_moe_surgery"][-1]["kept"] == expected
    assert saved["lightning_moe_surgery"][-1]["direction"] == "de-en"
    assert num_experts_of(saved["hyper_parameters"]) == 4
    assert saved["optimizer_states"] == [] and "loops" not in saved
    assert set(json.loads(usage_json.read_text())) == set(expected)
    # Every command loads the result: translate here, fit/validate through load_from_checkpoint below.
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "--ckpt", str(out), "--tgt-lang", "en", "--beam-size", "1", "--max-length", "4", "Hallo"])
    assert exit_info.value.code == 0


def test_select_experts_orders_and_ties():
    usage = {"a": torch.tensor([5.0, 0.0, 5.0, 9.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    assert select_experts(usage, 2) == {"a": [0, 3], "b": [0, 1]}  # the tie of 0 and 2 goes to the lower index
    assert select_experts(usage, 3) == {"a": [0, 2, 3], "b": [0, 1, 2]}
    random_pick = select_experts(usage, 2, "random", seed=3)
    assert all(len(v) == 2 and v == sorted(v) for v in random_pick.values())
    assert random_pick == select_experts(usage, 2, "random", seed=3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "9"], "between top_k=2 and num_experts=8"),
        (["--keep", "1"], "between top_k=2 and num_experts=8"),
        (["--keep", "4", "--per-direction", "de-fr"], "direction 'de-fr' has no example"),
        (["--keep", "4", "--split", "dev2"], "split='dev2' is not a split"),
    ],
)
def test_prune_errors(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.ckpt"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.ckpt").exists()


def test_prune_checkpoint_rejects_bad_kept_sets(ckpt):
    checkpoint = load_checkpoint_dict(ckpt)
    layers = list(translation_usage(MultitaskTranslationModule.from_checkpoint(ckpt), direction="en-de"))
    with pytest.raises(SurgeryError, match="same number in every layer"):
        prune_checkpoint(checkpoint, {layers[0]: [0, 1], layers[1]: [0, 1, 2]})
    with pytest.raises(SurgeryError, match="distinct indices"):
        prune_checkpoint(checkpoint, {layers[0]: [0, 0], layers[1]: [0, 1]})
    with pytest.raises(SurgeryError, match="exactly these layers"):
        prune_checkpoint(checkpoint, {layers[0]: [0, 1]})


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_with_itself_has_union_shapes_and_trains(ckpt, tmp_path, tmp_path_factory):
    out = tmp_path / "agg.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["aggregate", "--ckpt", str(ckpt), "--ckpt", str(ckpt), "--out", str(out)])
    assert exit_info.value.code == 0
    source, merged = load_checkpoint_dict(ckpt), load_checkpoint_dict(out)
    assert num_experts_of(merged["hyper_parameters"]) == 2 * E
    assert merged["optimizer_states"] == [] and merged["lr_schedulers"] == []
    for key, tensor in source["state_dict"].items():
        if key.endswith(("router.weight", "experts.w1", "experts.w2")):
            assert merged["state_dict"][key].shape == (2 * E, *tensor.shape[1:])
            assert torch.equal(merged["state_dict"][key], torch.cat([tensor, tensor]))
        else:
            assert torch.equal(merged["state_dict"][key], tensor)  # the mean of two equal tensors
    # It trains: load, fit a few steps, the loss goes down.
    module = MultitaskTranslationModule.load_from_checkpoint(out)
    assert all(m.num_experts == 2 * E for m in module.model.moe_layers())
    dm = _datamodule(tmp_path_factory)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = float(module.training_losses(batch)["loss"])
    L.seed_everything(0)
    _trainer(tmp_path, max_steps=8).fit(module, dm)
    with torch.no_grad():
        after = float(module.training_losses(batch)["loss"])
    assert after < before


def test_aggregate_two_checkpoints_averages_shared_weights(ckpt, ckpt_b, tmp_path, tmp_path_factory):
    a, b = load_checkpoint_dict(ckpt), load_checkpoint_dict(ckpt_b)
    merged = aggregate_experts([ckpt, ckpt_b], tmp_path / "ab.ckpt")
    key = "model.encoder.0.attn.q_proj.weight"
    torch.testing.assert_close(merged["state_dict"][key], (a["state_dict"][key] + b["state_dict"][key]) / 2)
    gate = "model.encoder.1.ffn.router.weight"
    assert torch.equal(merged["state_dict"][gate], torch.cat([a["state_dict"][gate], b["state_dict"][gate]]))
    # Training continues from it through the Trainer's resume path (fresh optimizer, step 0); with lr=0
    # the weights after two steps are exactly the aggregated ones, so they were loaded, not re-initialised.
    module = MultitaskTranslationModule(**{**TINY, "num_experts": 2 * E, "lr": 0.0})
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _datamodule(tmp_path_factory), ckpt_path=tmp_path / "ab.ckpt")
    assert trainer.global_step == 2
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, merged["state_dict"][name]), name


def test_aggregate_errors(ckpt, tmp_path, tmp_path_factory):
    a = load_checkpoint_dict(ckpt)
    with pytest.raises(SurgeryError, match="at least two checkpoints"):
        aggregate_checkpoints([a])
    other = _train(tmp_path, tmp_path_factory, 0, "wide.ckpt", d_ff=64)
    with pytest.raises(SurgeryError, match="d_ff=64"):
        aggregate_checkpoints([a, load_checkpoint_dict(other)], ["a", "wide"])
    retokenized = dict(a)
    retokenized["lightning_moe"] = {**a["lightning_moe"], "tokenizer": {"class_path": "x.Y", "state": {}}}
    with pytest.raises(SurgeryError, match="different tokenizers"):
        aggregate_checkpoints([a, retokenized])
    with pytest.raises(SystemExit) as exit_info:
        main(["aggregate", "--ckpt", str(ckpt), "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
