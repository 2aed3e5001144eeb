"""The command line: a few `fit` steps from the shipped recipes, then `translate` from the checkpoint."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_moe.cli import COMMANDS, main, run_cli
from lightning_moe.io import AtomicCheckpointIO

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
        if cb["class_path"].endswith("ProgressBar"):
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
    cli = run_cli(["fit", "-c", str(recipe)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # atomic writes by default
    out = capsys.readouterr().out
    assert "Run finished." in out and "Total FLOPs" not in out
    run = tmp_path / "run"
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    metrics = (run / "metrics.csv").read_text()  # one fixed run directory, metrics beside the checkpoints folder
    assert "train/loss" in metrics and "val/chrf" in metrics
    assert f"metrics: {run / 'metrics.csv'}" in out

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
                "",
                "Delete",
            ]
        )
    assert exc.value.code == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    assert len(lines) == 3 and lines[1] == ""  # empty input, empty output
    assert lines[0] and lines[2]

    main(["predict", "-c", str(recipe), "--ckpt_path", str(ckpts[0]), "--trainer.limit_predict_batches", "1"])
    out_lines = capsys.readouterr().out.strip().splitlines()
    last_bar = max(i for i, line in enumerate(out_lines) if line.startswith("Predicting"))
    predicted = out_lines[last_bar + 1 :]  # one translation per line after the progress bar
    assert len(predicted) == yaml.safe_load(recipe.read_text())["data"]["init_args"]["batch_size"]

    with pytest.raises(SystemExit) as exc:
        main(["translate", "--ckpt", str(ckpts[0]), "--tgt-lang", "xx", "Save"])
    assert exc.value.code == 2
    assert "'xx' is not a language of this model" in capsys.readouterr().err

    # A second fresh run in the same folder replaces last.ckpt and starts its own metrics.csv.
    main(["fit", "-c", str(recipe), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    captured = capsys.readouterr()
    assert "belongs to an earlier run" in captured.err
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    steps = [row["step"] for row in csv.DictReader((run / "metrics.csv").open()) if row.get("train/loss")]
    assert steps == ["0", "1"]
    assert not list(run.glob("version_*"))


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
    for command in COMMANDS:  # every command, one line each
        assert sum(line.strip().startswith(command + " ") for line in res.stdout.splitlines()) == 1, command
    assert "--model.help MultitaskTranslationModule" in res.stdout  # how to list the model fields
    res = subprocess.run(
        [sys.executable, "-m", "lightning_moe", "fit", "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and "--model.help MultitaskTranslationModule" in res.stdout.replace("\n", " ")
    assert "args parameter is intended" not in res.stderr  # no spurious LightningCLI warning


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.d_modl", "3"], "model.init_args.d_modl is not a field of MultitaskTranslationModule "
         "(did you mean 'd_model'?)"),
        (["--model.init_args.lr", "abc"], "model.init_args.lr: expected a float, got 'abc'"),
        (["--trainer.max_stepz", "3"], "unknown option --trainer.max_stepz (did you mean '--trainer.max_steps'?)"),
        (["--data.init_args.batch_size", "0"], "data: batch_size=0 must be >= 1"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line(override, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(ROOT / "recipes" / "m3_tiny.yaml"), *override])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not any("Namespace(" in line or "usage:" in line for line in err)


def test_unknown_command_suggests_one(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["translat", "--ckpt", "x"])
    assert exc.value.code == 2 and "did you mean 'translate'" in capsys.readouterr().err


@pytest.mark.slow
def test_max_time_stop_is_reported_loudly(tmp_path, capsys):
    recipe = _small_recipe("m3_tiny.yaml", tmp_path, steps=100000)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["trainer"].update(max_time="00:00:00:02", val_check_interval=100000, limit_val_batches=0)
    recipe.write_text(yaml.safe_dump(cfg))
    main(["fit", "-c", str(recipe)])
    captured = capsys.readouterr()
    assert "WARNING: max_time" in captured.out and "of max_steps=100000" in captured.err


def test_progress_bar_counts_steps_not_negative_epochs():
    from types import SimpleNamespace

    from lightning_moe.callbacks import MoEProgressBar

    bar = MoEProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=1200, global_step=300)
    assert bar._get_train_description(4).strip() == "Epoch 4 · step 300/1200"


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
