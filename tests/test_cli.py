"""The command line: a few `fit` steps from the shipped recipes, then `translate` from the checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_moe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _small_recipe(name: str, tmp_path: Path, steps: int = 3) -> Path:
    """The shipped recipe, with its outputs under tmp_path and a run of a few steps."""
    cfg = yaml.safe_load((ROOT / "recipes" / name).read_text())
    out = tmp_path / "run"
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, val_check_interval=steps, limit_val_batches=2, log_every_n_steps=1)
    trainer["default_root_dir"] = str(out)
    trainer["max_time"] = None
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(out / "checkpoints")
        if cb["class_path"].endswith("RichProgressBar"):
            cb["class_path"] = "lightning.pytorch.callbacks.TQDMProgressBar"
    init = cfg["model"]["init_args"]
    if "num_eval_examples" in init:
        init.update(num_eval_examples=1, beam_size=2, eval_max_length=8)
    cfg["data"]["init_args"]["vocab_size"] = 600
    if "samples_per_epoch" in cfg["data"]["init_args"]:
        cfg["data"]["init_args"]["samples_per_epoch"] = 2000
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_fit_from_recipe_then_translate(tmp_path, capsys):
    recipe = _small_recipe("m3_tiny.yaml", tmp_path)
    main(["fit", "-c", str(recipe)])
    out = capsys.readouterr().out
    assert "Run finished." in out
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/chrf" in metrics

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "translate",
                "--ckpt",
                str(ckpts[0]),
                "--tgt-lang",
                "de",
                "--beam-size",
                "2",
                "--max-length",
                "6",
                "Save",
                "Delete",
            ]
        )
    assert exc.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2

    main(["predict", "-c", str(recipe), "--ckpt_path", str(ckpts[0]), "--trainer.limit_predict_batches", "1"])
    out_lines = capsys.readouterr().out.strip().splitlines()
    last_bar = max(i for i, line in enumerate(out_lines) if line.startswith("Predicting"))
    predicted = out_lines[last_bar + 1 :]  # one translation per line after the progress bar
    assert len(predicted) == yaml.safe_load(recipe.read_text())["data"]["init_args"]["batch_size"]

    with pytest.raises(SystemExit) as exc:
        main(["translate", "--ckpt", str(ckpts[0]), "--tgt-lang", "xx", "Save"])
    assert exc.value.code == 2
    assert "'xx' is not a language of this model" in capsys.readouterr().err


def test_translate_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["translate", "--ckpt", str(tmp_path / "nope.ckpt"), "--tgt-lang", "de", "hi"])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_gpt_recipe_fits(tmp_path, capsys):
    recipe = _small_recipe("gpt_moe_tiny.yaml", tmp_path, steps=2)
    main(["fit", "-c", str(recipe)])
    assert "val/ppl" in capsys.readouterr().out
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main(["test", "-c", str(recipe), "--ckpt_path", str(last), "--trainer.limit_test_batches", "2"])
    assert "test/ppl" in capsys.readouterr().out


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "lightning_moe", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0
    assert "fit" in res.stdout


@pytest.mark.parametrize("recipe", ["m3_tiny.yaml", "m3_tiny_dense.yaml", "gpt_moe_tiny.yaml"])
def test_recipes_parse_and_document_every_field(recipe):
    text = (ROOT / "recipes" / recipe).read_text()
    yaml.safe_load(text)
    for line in text.splitlines():
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith("#") and not stripped.startswith("- class_path"):
            key, _, value = stripped.partition(":")
            if value.strip() and key not in ("class_path",):
                assert "#" in line, f"{recipe}: field without a comment: {line!r}"
