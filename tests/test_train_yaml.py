"""The plain-Python recipe runner: same objects as LightningCLI, no jsonargparse needed."""

from __future__ import annotations

import csv
import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lightning_moe.train_yaml import apply_override, instantiate, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Inner:
    width: int = 1
    name: str = "x"


def test_instantiate_class_paths_dataclasses_and_lists():
    built = instantiate({"class_path": "datetime.timedelta", "init_args": {"days": 1, "hours": 2}})
    assert built == datetime.timedelta(days=1, hours=2)
    assert instantiate({"width": 3}, _Inner | None) == _Inner(width=3)
    assert instantiate([{"class_path": "fractions.Fraction", "init_args": {"numerator": 1, "denominator": 4}}]) == [
        0.25
    ]
    assert instantiate({"a": {"b": 1}}) == {"a": {"b": 1}}  # no hint: mappings stay mappings
    with pytest.raises(ValueError, match=r"cannot import class_path 'nowhere\.Thing'"):
        instantiate({"class_path": "nowhere.Thing"})


def test_load_recipe_merges_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer: {max_steps: 5, devices: 1}\nmodel: {class_path: x.Y}\n")
    (tmp_path / "b.yaml").write_text("trainer: {max_steps: 7}\n")
    recipe = load_recipe([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    assert recipe["trainer"] == {"max_steps": 7, "devices": 1}
    apply_override(recipe, "model.init_args.config.num_experts=16")
    apply_override(recipe, "trainer.max_time=null")
    assert recipe["model"]["init_args"]["config"]["num_experts"] == 16 and recipe["trainer"]["max_time"] is None
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_override(recipe, "trainer.max_steps")


def _small_recipe(tmp_path: Path, out: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "recipes" / "m3_tiny.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(max_steps=2, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1, max_time=None)
    trainer["default_root_dir"] = str(out)
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if not cb["class_path"].endswith("ProgressBar")]
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(out / "checkpoints")
    trainer["enable_progress_bar"] = False
    cfg["model"]["init_args"]["num_eval_examples"] = 0
    cfg["data"]["init_args"].update(vocab_size=400, samples_per_epoch=256, languages=["de"])
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _val_losses(out: Path) -> list[str]:
    with next(out.rglob("metrics.csv")).open() as f:
        return [row["val/loss"] for row in csv.DictReader(f) if row.get("val/loss")]


@pytest.mark.slow
def test_runs_the_recipe_without_jsonargparse_like_lightning_cli(tmp_path):
    plain, cli = tmp_path / "plain", tmp_path / "cli"
    # The runner in a process where jsonargparse cannot be imported (as on the GPU image).
    code = (
        "import sys; sys.modules['jsonargparse'] = None\n"
        "from lightning_moe.train_yaml import main\n"
        f"main(['fit', '-c', {str(_small_recipe(tmp_path, plain))!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val/loss = " in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "lightning_moe", "fit", "-c", str(_small_recipe(tmp_path, cli))],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # Same recipe, same seed, deterministic CPU training: the same validation loss to the last digit.
    assert _val_losses(plain) == _val_losses(cli) and len(_val_losses(plain)) == 1
    assert sorted(p.name for p in (plain / "checkpoints").glob("*.ckpt")) == sorted(
        p.name for p in (cli / "checkpoints").glob("*.ckpt")
    )
