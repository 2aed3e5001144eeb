"""``ExactResume``: what Lightning does not save for a bit-identical resume, and a metrics file that continues.

Lightning's checkpoints hold the weights, optimizer, schedulers, loop counters and (for stateful
dataloaders such as :class:`~lightning_moe.data.batching.ResumableDataLoader`) the position in the
epoch. Two things are missing for a resumed run to repeat the uninterrupted one exactly:

- the random number generators (torch, CUDA, NumPy, Python ``random``) of *every* rank: dropout and
  Random Token Selection draw from them. Each checkpoint stores all ranks' states (gathered to the
  writer), and each rank restores its own right before the first resumed training step, after
  everything that runs at start-up (sanity validation, dataloader creation) has drawn what it draws.
- the metrics file: ``CSVLogger`` buffers rows, and a resumed run would start a new file. At every
  checkpoint the CSV loggers are flushed (and again right after the rows of that step are logged),
  and the step the checkpoint was taken at is stored; on resume the rows the killed run logged
  *after* that step are removed from ``metrics.csv``, so with
  :class:`~lightning_moe.loggers.ResumableCSVLogger` (a fixed run directory, as the recipes use) the
  file continues without duplicated or missing steps. A fresh run in a reused directory starts a
  fresh file. (A kill in the moment between writing a checkpoint and the next step can lose that
  one step's row.)

Training on CPU is deterministic, so ``kill -9`` at any moment and ``fit --ckpt_path last.ckpt``
give the same loss curve, bit for bit, as the run that was never interrupted.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

__all__ = ["ExactResume", "get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Tensor]:
    """This process's random generator states as tensors (int64/float64, safe to load weights-only)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": torch.tensor([int(np_state[2]), int(np_state[3])], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss, float(gauss is not None)], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    python = [int(v) for v in state["python"].tolist()]
    gauss, has = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has else None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


def _csv_loggers(trainer: Trainer) -> list[CSVLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]


def _metrics_file(logger: CSVLogger) -> Path:
    return Path(logger.log_dir) / "metrics.csv"


class ExactResume(Callback):
    """Save every rank's RNG states in each checkpoint, restore them on resume, and keep ``metrics.csv`` continuous.

    Add it to the Trainer's callbacks (the recipes do). See the module docstring for what it adds to
    Lightning's own resume.

    Example::

        trainer = L.Trainer(callbacks=[ExactResume()], logger=ResumableCSVLogger("runs/x"))
        trainer.fit(model, datamodule=dm, ckpt_path="runs/x/checkpoints/last.ckpt")
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None
        self._pending_rng: list[dict[str, Tensor]] | None = None
        self._resumed_log_step: int | None = None
        self._resuming = False
        self._saved_in_batch = False

    # ------------------------------------------------------------------ saving

    @override
    def state_dict(self) -> dict[str, Any]:
        """Every rank's RNG states and the logging step of this checkpoint (flushes the CSV loggers first)."""
        trainer = self._trainer
        if trainer is None:
            return {}
        for logger in _csv_loggers(trainer):
            logger.save()  # rows up to this checkpoint are on disk before it is
        self._saved_in_batch = True
        return {
            "world_size": trainer.world_size,
            "rng": self._gather_rng(trainer),
            "log_step": int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)),
        }

    @staticmethod
    def _gather_rng(trainer: Trainer) -> list[dict[str, Tensor]]:
        local = get_rng_state()
        if trainer.world_size == 1:
            return [local]
        device = trainer.strategy.root_device
        ranks: list[dict[str, Tensor]] = [{} for _ in range(trainer.world_size)]
        for name, tensor in local.items():
            gathered = trainer.strategy.all_gather(tensor.to(device))  # [world, ...]
            for rank in range(trainer.world_size):
                ranks[rank][name] = gathered[rank].cpu()
        return ranks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------------ resuming

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved states; they are applied right before the first resumed training step."""
        self._resuming = True
        rng = state_dict.get("rng")
        if rng and int(state_dict.get("world_size", len(rng))) == len(rng):
            self._pending_rng = list(rng)
        self._resumed_log_step = state_dict.get("log_step")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in _csv_loggers(trainer):
            path = _metrics_file(logger)
            if self._resuming and self._resumed_log_step is not None:
                if path.exists():
                    logger.experiment.metrics_keys = _keep_rows_up_to(path, self._resumed_log_step)
                else:
                    rank_zero_warn(
                        f"{path} is gone (Lightning's CSVLogger deletes it when a run starts), so the resumed metrics "
                        "start a new file; use lightning_moe.loggers.ResumableCSVLogger to continue it"
                    )
            elif path.exists():
                path.unlink()  # a new run in a reused directory starts its own file
                logger.experiment.metrics_keys = []

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._saved_in_batch = False  # ModelCheckpoint runs after this hook: a save now is of this batch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._saved_in_batch:
            # The rows of the step a checkpoint was taken at are logged after it: write them now too.
            self._saved_in_batch = False
            for logger in _csv_loggers(trainer):
                logger.save()
        if self._pending_rng is None:
            return
        states, self._pending_rng = self._pending_rng, None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} ranks but this run has "
                f"{trainer.world_size}; dropout and token selection will not repeat the interrupted run exactly"
            )
            return
        set_rng_state(states[trainer.global_rank])


def _keep_rows_up_to(path: Path, step: int) -> list[str]:
    """Rewrite ``metrics.csv`` without the rows logged after ``step``; returns its header (atomically)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("step", "") == "" or int(float(row["step"])) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header
