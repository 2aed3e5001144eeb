"""``LoadBalanceMonitor``: per-layer expert-load statistics, pictures and early warnings during training.

Shape legend: L MoE layers, E experts of a layer, S = E + 6 entries of one layer's packed window.

The hot path (``on_train_batch_end``) reads each layer's ``last_stats`` and adds all of them into one
flat device tensor with one ``cat`` and one ``add_``: no host sync, no collective. Once per logging
step the window is reduced over all ranks with a single ``strategy.reduce(..., "sum")``, copied to the
host once, turned into statistics and handed to the Trainer's loggers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe.callbacks.load_plots import heatmap_rgb, save_load_png
from lightning_moe.callbacks.metrics import LOAD_STATISTICS, LOWER_IS_WORSE, expert_load_statistics
from lightning_moe.moe import MoE, MoEStats, moe_layers

# The scalars that follow the E per-expert counts in a layer's packed window, in the order that
# `expert_load_statistics` takes them.
_SCALARS = ("num_tokens", "dropped", "router_entropy_sum", "aux_loss_sum", "z_loss_sum", "num_updates")


class LoadImbalanceWarning(UserWarning):
    """Warned once per MoE layer when it stays past a :class:`LoadBalanceMonitor` threshold."""


@dataclass(frozen=True)
class _Layer:
    name: str
    num_experts: int
    offset: int  # of the layer's segment in the packed window

    @property
    def size(self) -> int:
        return self.num_experts + len(_SCALARS)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; pass an integer >= {minimum}.")


class LoadBalanceMonitor(Callback):
    """Logs how evenly each MoE layer spreads tokens over its experts, and warns when one collapses.

    After every training batch the callback adds the ``last_stats`` of every
    :class:`~lightning_moe.MoE` layer of the LightningModule to a window kept on the device. Every
    ``log_every_n_steps`` optimizer steps it sums the window over all ranks (one collective), logs the
    statistics of :func:`~lightning_moe.callbacks.metrics.expert_load_statistics` to every logger of the
    Trainer and starts a new window. Logged keys (``<layer>`` is the module's qualified name)::

        {prefix}<layer>/{cv,max_load,min_load,dead_fraction,drop_fraction,router_entropy,aux_loss,z_loss}
        {prefix}worst/<statistic>         value of the worst layer (lowest min_load / router_entropy,
                                          highest otherwise)
        {prefix}worst_layer/<statistic>   index of that layer in module order
        {prefix}mean/<statistic>          mean over layers

    At the first logging step at or after every ``image_every_n_steps`` steps it also draws a heatmap of
    the share of tokens per (layer, expert) and a histogram of expert loads relative to their layer's
    mean: ``wandb.Image``/``wandb.Histogram`` with a ``WandbLogger``, ``add_image``/``add_histogram``
    (tags ``{prefix}load_heatmap``, ``{prefix}load_histogram``) with a ``TensorBoardLogger``, and a PNG
    file ``<log_dir>/load_balance/step_<step>.png`` with any other logger.

    Args:
        log_every_n_steps: Optimizer steps per window. Windows span gradient-accumulation micro-batches.
        image_every_n_steps: Optimizer steps between pictures; ``None`` draws none.
        warn_dead_fraction: Warn when a layer's fraction of dead experts (no token in a window) exceeds
            this, in ``[0, 1)``; ``None`` disables the check.
        warn_cv: Warn when a layer's coefficient of variation of tokens per expert exceeds this;
            ``None`` disables the check.
        warn_patience: Consecutive windows past a threshold before the warning, which is issued once per
            layer as a :class:`LoadImbalanceWarning`.
        prefix: Prepended to every logged key.

    Raises:
        ValueError: If an argument is out of range; the message names it and the valid range.

    Attributes:
        last_statistics: Statistics of the last logged window (summed over ranks), by layer name.
        last_tokens_per_expert: ``[E]`` float64 (token, choice) assignments per expert in the last logged
            window, summed over ranks, by layer name.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        image_every_n_steps: int | None = 500,
        warn_dead_fraction: float | None = None,
        warn_cv: float | None = None,
        warn_patience: int = 3,
        prefix: str = "moe/",
    ) -> None:
        _check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        if image_every_n_steps is not None:
            _check_int("image_every_n_steps", image_every_n_steps, minimum=1)
        if warn_dead_fraction is not None and not 0.0 <= warn_dead_fraction < 1.0:
            raise ValueError(
                f"warn_dead_fraction={warn_dead_fraction!r} is not a fraction in [0, 1); pass e.g. 0.25 to "
                "warn when more than a quarter of a layer's experts get no token, or None to disable."
            )
        if warn_cv is not None and not warn_cv > 0.0:
            raise ValueError(f"warn_cv={warn_cv!r} is not positive; pass e.g. 1.0, or None to disable.")
        _check_int("warn_patience", warn_patience, minimum=1)
        if not isinstance(prefix, str):
            raise ValueError(f"prefix={prefix!r} is not a string; pass e.g. 'moe/'.")

        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self.warn_dead_fraction = warn_dead_fraction
        self.warn_cv = warn_cv
        self.warn_patience = warn_patience
        self.prefix = prefix

        self.last_statistics: dict[str, dict[str, float]] = {}
        self.last_tokens_per_expert: dict[str, Tensor] = {}

        self._layers: list[_Layer] = []
        self._modules: list[MoE] = []
        self._seen: list[MoEStats | None] = []  # stats already added, to skip layers a batch did not run
        self._window: Tensor | None = None  # packed sums of all layers, on the compute device
        self._zeros: Tensor | None = None  # stands in for a layer without new stats
        self._one: Tensor | None = None  # counts forwards (num_updates)
        self._global_rank = 0
        self._last_step = 0
        self._last_image_step = 0
        self._strikes: dict[str, int] = {}  # consecutive windows past a threshold, by layer
        self._warned: set[str] = set()
        self._pending_state: dict[str, Any] | None = None  # loaded before the layers were known

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = moe_layers(pl_module)
        if not named:
            rank_zero_warn(
                f"LoadBalanceMonitor found no lightning_moe.MoE layer in {type(pl_module).__name__}; it will "
                "log nothing. Remove the callback or build the model from lightning_moe.MoE layers."
            )
        self._layers, self._modules, offset = [], [], 0
        for name, module in named:
            layer = _Layer(name=name, num_experts=int(module.num_experts), offset=offset)
            self._layers.append(layer)
            self._modules.append(module)
            offset += layer.size
        device = pl_module.device
        # float64 keeps long windows of large counts exact; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._window = torch.zeros(offset, device=device, dtype=dtype)
        self._zeros = torch.zeros(max((layer.size for layer in self._layers), default=0), device=device)
        self._one = torch.ones(1, device=device)
        self._seen = [None] * len(self._layers)
        self._global_rank = trainer.global_rank
        self._last_step = trainer.global_step
        if self._pending_state is not None:
            self._restore(self._pending_state)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._window is None or not self._layers:
            return
        self._accumulate()
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step in this batch
            return
        previous, self._last_step = self._last_step, step
        if step // self.log_every_n_steps > previous // self.log_every_n_steps:
            self._log_window(trainer, step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop references into the model; the layout in `_layers` stays for `state_dict`.
        self._modules, self._seen = [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.name for layer in self._layers],
            "num_experts": [layer.num_experts for layer in self._layers],
            "window": None if self._window is None else self._window.cpu(),
            "last_image_step": self._last_image_step,
            "strikes": dict(self._strikes),
            "warned": sorted(self._warned),
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # `state_dict()` holds this rank's partial window, but only rank 0's copy is written: store the sum
        # over ranks instead, so that a resumed run (where rank 0 alone restores it) loses no token.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and self._window is not None:
            state["window"] = trainer.strategy.reduce(self._window.clone(), reduce_op="sum").cpu()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._window is None:  # layers unknown until `on_train_start`
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    # ------------------------------------------------------------------ internals

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        self._last_image_step = int(state.get("last_image_step", 0))
        self._strikes = {str(name): int(count) for name, count in state.get("strikes", {}).items()}
        self._warned = {str(name) for name in state.get("warned", ())}
        window = state.get("window")
        if window is None or self._window is None:
            return
        layout = ([layer.name for layer in self._layers], [layer.num_experts for layer in self._layers])
        if (list(state.get("layers", ())), list(state.get("num_experts", ()))) != layout:
            rank_zero_warn(
                f"LoadBalanceMonitor: the checkpoint's MoE layers {state.get('layers')} with "
                f"{state.get('num_experts')} experts differ from the model's {layout[0]} with {layout[1]}; "
                "the partial window of the checkpoint is dropped (thresholds' counters are kept by name)."
            )
            return
        if self._global_rank == 0:  # the saved window already sums all ranks
            self._window.copy_(window)

    def _accumulate(self) -> None:
        assert self._window is not None and self._zeros is not None and self._one is not None
        parts: list[Tensor] = []
        fresh = False
        for index, (layer, module) in enumerate(zip(self._layers, self._modules, strict=True)):
            stats = module.last_stats
            if stats is None or stats is self._seen[index]:  # layer did not run in this batch
                parts.append(self._zeros[: layer.size])
                continue
            self._seen[index] = stats
            fresh = True
            parts += [
                stats.tokens_per_expert,
                stats.num_tokens.reshape(1),
                stats.dropped.reshape(1),
                stats.router_entropy_sum.reshape(1),
                stats.aux_loss.reshape(1),
                stats.z_loss.reshape(1),
                self._one,
            ]
        if fresh:
            self._window.add_(torch.cat(parts))

    def _log_window(self, trainer: pl.Trainer, step: int) -> None:
        assert self._window is not None
        reduced = trainer.strategy.reduce(self._window, reduce_op="sum")
        window = reduced.to("cpu", torch.float64, copy=True)  # the only host sync of the callback
        self._window.zero_()

        statistics: dict[str, dict[str, float]] = {}
        tokens: dict[str, Tensor] = {}
        for layer in self._layers:
            segment = window[layer.offset : layer.offset + layer.size]
            counts_E, scalars = segment[: layer.num_experts], segment[layer.num_experts :]
            if counts_E.sum() == 0:  # the layer routed no token in this window
                continue
            values = expert_load_statistics(counts_E, *scalars.unbind())
            statistics[layer.name] = {name: float(value) for name, value in values.items()}
            tokens[layer.name] = counts_E
        self.last_statistics, self.last_tokens_per_expert = statistics, tokens
        if not statistics:
            return

        self._check_thresholds(statistics, step)
        metrics = self._metrics(statistics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

        every = self.image_every_n_steps
        if every is not None and step // every > self._last_image_step // every:
            self._last_image_step = step
            if trainer.is_global_zero:
                self._log_images(trainer, tokens, step)

    def _metrics(self, statistics: dict[str, dict[str, float]]) -> dict[str, float]:
        metrics = {
            f"{self.prefix}{name}/{stat}": value
            for name, layer_stats in statistics.items()
            for stat, value in layer_stats.items()
        }
        index_of = {layer.name: index for index, layer in enumerate(self._layers)}
        names = list(statistics)
        for stat in LOAD_STATISTICS:
            values = [statistics[name][stat] for name in names]
            pick = min if stat in LOWER_IS_WORSE else max
            worst = pick(range(len(values)), key=values.__getitem__)
            metrics[f"{self.prefix}worst/{stat}"] = values[worst]
            metrics[f"{self.prefix}worst_layer/{stat}"] = float(index_of[names[worst]])
            metrics[f"{self.prefix}mean/{stat}"] = math.fsum(values) / len(values)
        return metrics

    def _check_thresholds(self, statistics: dict[str, dict[str, float]], step: int) -> None:
        if self.warn_dead_fraction is None and self.warn_cv is None:
            return
        for name, stats in statistics.items():
            reasons = []
            dead = stats["dead_fraction"]
            if self.warn_dead_fraction is not None and dead > self.warn_dead_fraction:
                reasons.append(f"dead experts {dead:.1%} > warn_dead_fraction={self.warn_dead_fraction}")
            if self.warn_cv is not None and stats["cv"] > self.warn_cv:
                reasons.append(f"cv={stats['cv']:.3g} > warn_cv={self.warn_cv}")
            if not reasons:
                self._strikes[name] = 0
                continue
            self._strikes[name] = self._strikes.get(name, 0) + 1
            if self._strikes[name] >= self.warn_patience and name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(
                    f"MoE layer '{name}' is imbalanced for {self._strikes[name]} consecutive window(s) of "
                    f"{self.log_every_n_steps} steps (step {step}): {'; '.join(reasons)} "
                    f"(max_load={stats['max_load']:.3g}, drop_fraction={stats['drop_fraction']:.1%}). "
                    "If its router collapsed, raise aux_loss_weight, add router_jitter or lower the "
                    "learning rate of the router.",
                    category=LoadImbalanceWarning,
                )

    def _log_images(self, trainer: pl.Trainer, tokens: dict[str, Tensor], step: int) -> None:
        names = list(tokens)
        share_LE = np.full((len(names), max(t.numel() for t in tokens.values())), np.nan)
        for row, counts_E in enumerate(tokens.values()):
            share_LE[row, : counts_E.numel()] = (counts_E / counts_E.sum()).numpy()
        relative = np.concatenate([(counts_E / counts_E.mean()).numpy() for counts_E in tokens.values()])
        heatmap_key, histogram_key = f"{self.prefix}load_heatmap", f"{self.prefix}load_histogram"
        rgb: np.ndarray | None = None
        png_dirs: set[Path] = set()
        for logger in trainer.loggers:
            if isinstance(logger, (WandbLogger, TensorBoardLogger)) and rgb is None:
                rgb = heatmap_rgb(share_LE, names, step)
            if isinstance(logger, WandbLogger):
                import wandb

                images = {
                    heatmap_key: wandb.Image(rgb, caption=f"share of tokens per expert, step {step}"),
                    histogram_key: wandb.Histogram(relative),
                }
                logger.log_metrics(images, step=step)  # type: ignore[arg-type]
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(heatmap_key, rgb, global_step=step, dataformats="HWC")
                logger.experiment.add_histogram(histogram_key, relative, global_step=step)
            else:
                png_dirs.add(_log_dir(logger, trainer))
        for directory in sorted(png_dirs):
            save_load_png(directory / "load_balance" / f"step_{step:08d}.png", share_LE, relative, names, step)


def _log_dir(logger: Logger, trainer: pl.Trainer) -> Path:
    directory = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
    return Path(directory)
