"""A tiny translation run for the resume tests: ``python tests/resume_job.py OUT [--kill-at N] [--ckpt-path CKPT]``.

Trains a 2-layer MoE encoder-decoder (dropout, Random Token Selection: the RNG matters) on the bundled
corpus with small batches, so an epoch is 12 steps and the runs cross epoch boundaries; checkpoints
``last.ckpt`` every 3 steps; logs every step to ``OUT/metrics.csv``. ``--kill-at N`` sends SIGKILL to
the process itself at the start of step N (a real ``kill -9``: nothing gets to clean up).
``--devices 2`` runs it on two CPU processes with ``ExpertParallelStrategy(expert_parallel_size=2)``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_moe.callbacks import ExactResume, NonFiniteGuard
from lightning_moe.data import MultilingualDataModule
from lightning_moe.io import AtomicCheckpointIO
from lightning_moe.loggers import ResumableCSVLogger
from lightning_moe.modules import MultitaskTranslationModule


def datamodule(tokenizer: str | None = None) -> MultilingualDataModule:
    """The job's data: 8-example batches, 96 draws per epoch (12 batches), length buckets of 4 batches."""
    return MultilingualDataModule(
        languages=["de", "fr"], vocab_size=300, batch_size=8, samples_per_epoch=96, max_length=24,
        bucket_batches=4, seed=3, tokenizer_path=tokenizer,
    )  # fmt: skip


class _DumpBatches(Callback):
    """Save each rank's ``src_ids`` per ``(epoch, batch index)`` to ``OUT/batches_rank<r>.pt`` at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen[(trainer.current_epoch, batch_idx)] = batch["src_ids"].clone()

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        torch.save(self.seen, self.out / f"batches_rank{trainer.global_rank}.pt")


class _KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            # Started as a process-group leader (the tests do), kill the whole job: every rank at once.
            if os.getpgid(0) == os.getpid() or os.environ.get("LOCAL_RANK", "0") != "0":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--dump-batches", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    L.seed_everything(7, verbose=False)
    dm = datamodule(args.tokenizer)
    module = MultitaskTranslationModule(
        d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, dropout=0.1, max_positions=32,
        moe_every=1, num_experts=4, top_k=2, expert_ffn_size=32, capacity_factor=1.0, random_token_selection=True,
        z_loss_weight=0.001, lr=3e-3, warmup_steps=4, num_eval_examples=0,
    )  # fmt: skip
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=3, save_top_k=0, save_last=True),
        ExactResume(),
        NonFiniteGuard(),
    ]
    if args.kill_at is not None:
        callbacks.append(_KillAt(args.kill_at))
    if args.dump_batches:
        callbacks.append(_DumpBatches(out))
    strategy: object = "auto"
    if args.devices > 1:
        from lightning_moe import ExpertParallelStrategy

        strategy = ExpertParallelStrategy(expert_parallel_size=args.devices)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, val_check_interval=10,
        check_val_every_n_epoch=None, limit_val_batches=2, num_sanity_val_steps=1, log_every_n_steps=1,
        logger=ResumableCSVLogger(out), callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, plugins=[AtomicCheckpointIO()] if args.devices == 1 else None,
        gradient_clip_val=1.0, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main(sys.argv[1:])
