"""NonFiniteGuard: a diverging run stops naming the step, the term and the MoE layer; nothing non-finite is saved."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_moe import MoE
from lightning_moe.callbacks import NonFiniteError, NonFiniteGuard
from lightning_moe.cli import main
from lightning_moe.io import load_checkpoint

torch.set_num_threads(1)


class _Tiny(L.LightningModule):
    """One MoE layer and a head; ``poison`` maps a step to what turns non-finite there."""

    def __init__(self, poison: dict[int, str] | None = None, val_nan: bool = False) -> None:
        super().__init__()
        self.moe = MoE(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, capacity_factor=None)
        self.head = nn.Linear(8, 1)
        self.poison = poison or {}
        self.val_nan = val_nan

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        what = self.poison.get(self.global_step)
        x = batch * float("nan") if what == "input" else batch
        loss = self.head(self.moe(x)).pow(2).mean()
        if what == "loss":
            loss = loss * float("inf")
        return {"loss": loss + self.moe.aux_loss, "task": loss.detach()}

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self.head(self.moe(batch)).pow(2).mean()
        self.log("val_loss", loss * float("nan") if self.val_nan else loss)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(list(torch.randn(64, 6, 8, generator=g)), batch_size=None)


def _trainer(tmp_path: Path, guard: NonFiniteGuard, steps: int = 12, **kwargs) -> L.Trainer:  # type: ignore[no-untyped-def]
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[guard, ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, save_last=True)],
        default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_stops_naming_step_term_and_layer(tmp_path):
    L.seed_everything(0)
    guard = NonFiniteGuard(check_every_n_steps=4)
    trainer = _trainer(tmp_path, guard, val_check_interval=100, check_val_every_n_epoch=None)
    with pytest.raises(NonFiniteError) as exc:
        trainer.fit(_Tiny(poison={5: "input"}), train_dataloaders=_loader(), val_dataloaders=_loader())
    message = str(exc.value)
    assert "training step 5" in message and "MoE layer 'moe'" in message and "router" in message, message
    assert trainer.global_step == 8  # the first check after step 5
    assert not list(tmp_path.glob("*.ckpt"))  # nothing was checkpointed


def test_names_a_task_loss_that_is_infinite(tmp_path):
    guard = NonFiniteGuard(check_every_n_steps=1)
    trainer = _trainer(tmp_path, guard)
    with pytest.raises(
        NonFiniteError, match=r"training step 3: the training term 'task' is inf; also .* the training loss"
    ):
        trainer.fit(_Tiny(poison={3: "loss"}), train_dataloaders=_loader())


def test_no_checkpoint_is_written_from_non_finite_state(tmp_path):
    # The check runs before every save: the step-4 checkpoint after a NaN at step 2 is refused.
    guard = NonFiniteGuard(check_every_n_steps=100)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[guard, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)],
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match="training step 2"):
        trainer.fit(_Tiny(poison={2: "input"}), train_dataloaders=_loader())
    assert not list(tmp_path.glob("*.ckpt"))


def test_a_non_finite_monitored_metric_is_never_saved_as_best(tmp_path):
    guard = NonFiniteGuard()
    trainer = _trainer(tmp_path, guard, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2)
    with pytest.raises(NonFiniteError, match="val_loss = nan"):
        trainer.fit(_Tiny(val_nan=True), train_dataloaders=_loader(), val_dataloaders=_loader())
    assert not list(tmp_path.glob("*.ckpt"))


def test_skip_policy_skips_the_step_and_keeps_training(tmp_path):
    guard = NonFiniteGuard(policy="skip")
    module = _Tiny(poison={3: "input", 7: "loss"})
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[guard])  # fmt: skip
    with pytest.warns(UserWarning, match="step 3: non-finite"):
        trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 10 and guard.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # AdamW counted only the 8 steps it took: the skipped ones left weights and moments untouched
    state = trainer.optimizers[0].state[module.head.weight]
    assert int(state["step"]) == 8


def test_skip_policy_gives_up_after_consecutive_skips(tmp_path):
    guard = NonFiniteGuard(policy="skip", max_consecutive_skips=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[guard])  # fmt: skip
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        trainer.fit(_Tiny(poison={4: "loss", 5: "loss", 6: "loss"}), train_dataloaders=_loader())


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="policy='retry' is not supported"):
        NonFiniteGuard(policy="retry")
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        NonFiniteGuard(check_every_n_steps=0)


@pytest.mark.slow
def test_diverging_recipe_exits_nonzero_naming_the_term(tmp_path, capsys):
    from test_cli import _small_recipe

    recipe = _small_recipe("m3_tiny.yaml", tmp_path, steps=40)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["model"]["init_args"].update(lr=1000.0, warmup_steps=1)
    cfg["trainer"].update(val_check_interval=20, log_every_n_steps=10)
    recipe.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(recipe)])
    assert exc.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite value at training step" in err[0], err
    assert "translate" not in capsys.readouterr().out
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):  # anything written is finite
        weights = load_checkpoint(ckpt, check_finite=False)["state_dict"].values()
        assert all(math.isfinite(float(w.float().abs().sum())) for w in weights)
