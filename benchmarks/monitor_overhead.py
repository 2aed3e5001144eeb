"""Step-time overhead of LoadBalanceMonitor on a recipe's model and data.

Trains the recipe's model from the same seed several times, alternating runs without and with
``LoadBalanceMonitor(log_every_n_steps=50)``, and compares the mean wall time per optimizer step
after a warm-up (data loading, forward, backward, optimizer, all callbacks; validation and
checkpointing off, CSVLogger on in both arms so the logging path is the same).

    python benchmarks/monitor_overhead.py --recipe recipes/m3_tiny.yaml --steps 300 --repeats 3
    python benchmarks/monitor_overhead.py --accelerator gpu --precision bf16-mixed   # on a GPU

Prints one line per run and a summary; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_moe.callbacks import LoadBalanceMonitor


class StepClock(Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step (device synced at both)."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start = self.end = 0.0

    def _now(self, pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup and not self.start:
            self.start = self._now(pl_module)
        elif trainer.global_step == self.last:
            self.end = self._now(pl_module)

    def seconds_per_step(self) -> float:
        return (self.end - self.start) / (self.last - self.warmup)


class TimedMonitor(LoadBalanceMonitor):
    """LoadBalanceMonitor that also times its own ``on_train_batch_end`` inside the clock's span."""

    def __init__(self, clock: StepClock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.hot_seconds: list[float] = []  # steps that only accumulate
        self.log_seconds: list[float] = []  # logging steps (reduce, host copy, statistics, loggers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        seconds = time.perf_counter() - start
        step = trainer.global_step
        if self.clock.warmup < step <= self.clock.last:
            (self.log_seconds if step % self.log_every_n_steps == 0 else self.hot_seconds).append(seconds)


def instantiate(spec: dict | None):
    """``{"class_path": "pkg.Class", "init_args": {...}}`` -> ``pkg.Class(**init_args)`` (None stays None)."""
    if spec is None:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def build(recipe: dict, seed: int) -> tuple[LightningModule, LightningDataModule | None]:
    L.seed_everything(seed, verbose=False)
    return instantiate(recipe["model"]), instantiate(recipe.get("data"))


def run_once(args, recipe, datamodule, monitor: bool, root: Path) -> tuple[float, TimedMonitor | None]:
    model, _ = build(recipe, args.seed)
    clock = StepClock(args.warmup, args.warmup + args.steps)
    timed = TimedMonitor(clock, log_every_n_steps=args.log_every, image_every_n_steps=args.image_every)
    callbacks: list[Callback] = [timed, clock] if monitor else [clock]
    trainer_cfg = recipe.get("trainer", {})
    trainer = L.Trainer(
        accelerator=args.accelerator or trainer_cfg.get("accelerator", "auto"),
        devices=args.devices or trainer_cfg.get("devices", 1),
        precision=args.precision or trainer_cfg.get("precision", "32-true"),
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 50),
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(root, name="monitor" if monitor else "baseline"),
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=datamodule)
    return clock.seconds_per_step(), timed if monitor else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/m3_tiny.yaml")
    parser.add_argument("--steps", type=int, default=300, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="optimizer steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm, interleaved")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--image-every", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--accelerator", default=None, help="default: the recipe's")
    parser.add_argument("--devices", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--precision", default=None, help="default: the recipe's")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="set a recipe entry, e.g. model.init_args.moe_backend=torch (VALUE is parsed as YAML)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    for item in args.override:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    _, datamodule = build(recipe, args.seed)  # reused by every run: the tokenizer is trained once
    times: dict[str, list[float]] = {"baseline": [], "monitor": []}
    hot: list[float] = []
    logging: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for monitor in (False, True) if repeat % 2 == 0 else (True, False):
                arm = "monitor" if monitor else "baseline"
                seconds, timed = run_once(args, recipe, datamodule, monitor, Path(root))
                times[arm].append(seconds)
                line = f"run {repeat} {arm:8s}: {1e3 * seconds:8.2f} ms/step"
                if timed is not None:
                    hot += timed.hot_seconds
                    logging += timed.log_seconds
                    in_hook = (sum(timed.hot_seconds) + sum(timed.log_seconds)) / args.steps
                    line += f"  (inside the monitor's hook: {1e6 * in_hook:.0f} us/step)"
                print(line, flush=True)

    base, mon = statistics.mean(times["baseline"]), statistics.mean(times["monitor"])
    overhead = mon / base - 1
    hook_per_step = (sum(hot) + sum(logging)) / (args.steps * args.repeats)
    print(
        f"\n{args.recipe}: {args.steps} steps x {args.repeats} runs per arm, log_every_n_steps={args.log_every}\n"
        f"baseline {1e3 * base:.2f} ms/step (min {1e3 * min(times['baseline']):.2f}), "
        f"monitor {1e3 * mon:.2f} ms/step (min {1e3 * min(times['monitor']):.2f}), "
        f"overhead {100 * overhead:+.2f}% (mean), {100 * (min(times['monitor']) / min(times['baseline']) - 1):+.2f}% (min)\n"
        f"time inside the monitor's hook: {1e6 * statistics.mean(hot):.0f} us on accumulate-only steps, "
        f"{1e3 * statistics.mean(logging):.2f} ms on logging steps; {1e6 * hook_per_step:.0f} us/step on average "
        f"= {100 * hook_per_step / base:.2f}% of the baseline step"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "times": times,
                    "hook_seconds_per_step": hook_per_step,
                    "overhead_mean": overhead,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
