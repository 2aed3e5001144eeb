"""``NonFiniteGuard``: a diverging run stops with an error that names the step, the term and the MoE layer.

Every training step the guard records, on the device and without a host sync, whether each loss
term is finite: the training loss, every MoE layer's router load-balancing loss and z-loss
(``moe.last_stats``), the gradient norm, and the extra tensors a ``training_step`` returns in its
dict. The flags are read on the host once per check (every ``check_every_n_steps`` optimizer steps,
default the Trainer's ``log_every_n_steps``; before every validation and every checkpoint; at the
end of training). On the first non-finite value the run stops with a :class:`NonFiniteError` that
names the first step where it happened, the term, and for router terms the MoE layer.

A checkpoint is never written from non-finite state: before each save the guard checks the pending
flags and that every weight is finite, and after each validation that the metrics ``ModelCheckpoint``
ranks by are finite, so no NaN model is ever saved as "best" (or as ``last.ckpt``).

``policy="skip"`` instead skips each optimizer step whose loss terms or gradients are non-finite
(the gradients are dropped, so the optimizer leaves weights and moments untouched; the learning-rate
schedule still advances) and stops only after ``max_consecutive_skips`` skipped steps in a row. It
reads one flag on the host per step, before the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe.moe.layer import moe_layers

__all__ = ["NonFiniteError", "NonFiniteGuard"]

POLICIES = ("stop", "skip")
_NEVER = 2**62  # "no non-finite value seen" in the per-term first-step record
_LOSS = "loss"
_GRAD_NORM = "grad_norm"


class NonFiniteError(RuntimeError):
    """Training produced a non-finite value; the message names the step, the term and the fix."""


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (each rank checks what it holds), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _describe(name: str) -> str:
    """A term's name as the error shows it: ``the router aux_loss of MoE layer 'model.encoder.layers.1.ffn'``."""
    term, _, layer = name.partition("@")
    if layer:
        return f"the router {term} of MoE layer {layer!r}"
    if name == _LOSS:
        return "the training loss"
    if name == _GRAD_NORM:
        return "the gradient norm"
    return f"the training term {name!r}"


class NonFiniteGuard(Callback):
    """Stop (or skip the step) on the first NaN or infinity in the loss terms or gradients.

    Args:
        policy: ``"stop"`` (default): raise :class:`NonFiniteError` at the next check, naming the first
            non-finite step and term. ``"skip"``: skip each optimizer step with a non-finite loss term or
            gradient norm (one host sync per step), and stop after ``max_consecutive_skips`` in a row.
        check_every_n_steps: optimizer steps between host reads of the flags with ``policy="stop"``;
            ``None`` uses the Trainer's ``log_every_n_steps`` (Lightning syncs then anyway). Checks also
            run before every validation and checkpoint and at the end of training.
        max_consecutive_skips: with ``policy="skip"``, stop after this many skipped steps in a row.
        check_gradients: also check the gradient norm before each optimizer step.

    Raises:
        ValueError: on an unknown ``policy`` or a non-positive count.

    Example::

        trainer = L.Trainer(callbacks=[NonFiniteGuard()])  # the recipes add it by default
    """

    def __init__(
        self,
        policy: str = "stop",
        check_every_n_steps: int | None = None,
        max_consecutive_skips: int = 10,
        check_gradients: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not supported; choose one of {POLICIES}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1, or None for log_every_n_steps")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.policy = policy
        self.check_every_n_steps = check_every_n_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._index: dict[str, int] = {}  # term name -> row of the records below
        self._rows: dict[tuple[tuple[str, ...], torch.device], Tensor] = {}  # cached row indices per term list
        self._first_step: Tensor | None = None  # [terms] int64: first step each term was non-finite
        self._first_value: Tensor | None = None  # [terms] float32: its value then
        self._step_ok: Tensor | None = None  # () bool: every term of the current step is finite (skip policy)
        self._last_checked = -1

    # ------------------------------------------------------------------ recording (no host sync)

    def _record(self, names: list[str], values: list[Tensor], step: int) -> None:
        if not names:
            return
        values_T = torch.stack([_local(v).detach().float().reshape(()) for v in values])
        device = values_T.device
        for name in names:
            if name not in self._index:
                self._index[name] = len(self._index)
        grow = len(self._index) - (0 if self._first_step is None else self._first_step.numel())
        if self._first_step is None or self._first_step.device != device or grow > 0:
            first = torch.full((len(self._index),), _NEVER, dtype=torch.int64, device=device)
            value = torch.zeros(len(self._index), dtype=torch.float32, device=device)
            if self._first_step is not None:
                old = self._first_step.numel()
                first[:old] = self._first_step.to(device)
                value[:old] = self._first_value.to(device)  # type: ignore[union-attr]
            self._first_step, self._first_value = first, value
        key = (tuple(names), device)
        rows = self._rows.get(key)
        if rows is None:  # built once per set of terms: a host-to-device copy every step would sync
            rows = self._rows[key] = torch.tensor([self._index[n] for n in names], device=device)
        finite_T = torch.isfinite(values_T)
        new_bad_T = ~finite_T & (self._first_step[rows] == _NEVER)
        self._first_step[rows] = torch.where(new_bad_T, step, self._first_step[rows])
        self._first_value[rows] = torch.where(new_bad_T, values_T, self._first_value[rows])  # type: ignore[index]
        if self.policy == "skip":
            ok = finite_T.all()
            self._step_ok = ok if self._step_ok is None else self._step_ok & ok

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_ok = None

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        names, values = [], []
        for layer_name, layer in moe_layers(pl_module):
            stats = layer.last_stats
            if stats is not None:
                names += [f"aux_loss@{layer_name}", f"z_loss@{layer_name}"]
                values += [stats.aux_loss, stats.z_loss]
        names.append(_LOSS)
        values.append(loss)
        self._record(names, values, trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.check_gradients and grads:
            norm = torch.nn.utils.get_total_norm(grads, foreach=None)
            self._record([_GRAD_NORM], [norm.to(grads[0].device)], trainer.global_step)
        if self.policy == "skip":
            self._maybe_skip(trainer, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(outputs, Mapping):
            extra = [(k, v) for k, v in outputs.items() if k != _LOSS and isinstance(v, Tensor) and v.numel() == 1]
            if extra:
                # outputs come after the optimizer step: they belong to the step that just finished
                self._record([k for k, _ in extra], [v for _, v in extra], trainer.global_step - 1)
        every = self.check_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        step = trainer.global_step
        if self.policy == "stop" and step % every == 0 and step != self._last_checked:
            self._last_checked = step  # once per optimizer step, also with gradient accumulation
            self.check(trainer)

    # ------------------------------------------------------------------ skip policy

    def _maybe_skip(self, trainer: Trainer, optimizer: Optimizer) -> None:
        ok = bool(self._step_ok) if self._step_ok is not None else True
        if trainer.world_size > 1:
            ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
        step = trainer.global_step
        self._step_ok = None
        if ok:
            self._consecutive_skips = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without gradients untouched
        self.skipped_steps += 1
        self._consecutive_skips += 1
        bad = self._bad_terms_at(step)
        what = ", ".join(_describe(n) for n in bad) or "a term on another rank"
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self._consecutive_skips} optimizer steps in a row (up to step {step}) had non-finite values "
                f"({what}); the run diverged: lower the learning rate (model.init_args.lr) or resume from an earlier "
                "checkpoint"
            )
        rank_zero_warn(
            f"step {step}: non-finite {what}; the optimizer step was skipped ({self.skipped_steps} skipped so far)"
        )

    def _bad_terms_at(self, step: int) -> list[str]:
        if self._first_step is None:
            return []
        first = self._first_step.tolist()
        return [name for name, row in self._index.items() if first[row] == step]

    # ------------------------------------------------------------------ host checks

    def check(self, trainer: Trainer) -> None:
        """Read the flags (one host sync; a ``min`` reduction across ranks) and raise on a non-finite value.

        With ``policy="skip"`` only the skip counter applies; this is a no-op.

        Raises:
            NonFiniteError: naming the first non-finite step and term.
        """
        if self.policy != "stop" or self._first_step is None:
            return
        first = self._first_step
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first.clone(), reduce_op="min")
        steps = first.tolist()
        step = min(steps) if steps else _NEVER
        if step >= _NEVER:
            return
        local = self._first_step.tolist()
        values = self._first_value.tolist()  # type: ignore[union-attr]
        bad = [name for name, row in self._index.items() if steps[row] == step]
        bad.sort(key=_priority)
        head = bad[0]
        row = self._index[head]
        value = f" is {values[row]}" if local[row] == step else " is non-finite (on another rank)"
        others = f"; also non-finite at that step: {', '.join(_describe(n) for n in bad[1:4])}" if bad[1:] else ""
        raise NonFiniteError(
            f"non-finite value at training step {step}: {_describe(head)}{value}{others}. The run diverged; nothing "
            "from that step on was checkpointed. Lower the learning rate (model.init_args.lr), keep gradient "
            "clipping on (trainer.gradient_clip_val), or use NonFiniteGuard(policy='skip') to skip such steps"
        )

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.check(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for callback in trainer.checkpoint_callbacks:
            monitor = callback.monitor if isinstance(callback, ModelCheckpoint) else None
            value = trainer.callback_metrics.get(monitor) if monitor else None
            if value is not None and not math.isfinite(float(value)):
                raise NonFiniteError(
                    f"{monitor} = {float(value)} after the validation at step {trainer.global_step}: the model "
                    "diverged, so it is not checkpointed. Lower the learning rate (model.init_args.lr) or resume "
                    "from an earlier checkpoint"
                )

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check(trainer)
        params = [(name, _local(p)) for name, p in pl_module.named_parameters()]
        params = [(name, t) for name, t in params if t.is_floating_point() and t.numel() > 0]
        if not params:
            return
        bad_P = torch.stack([~torch.isfinite(t).all() for _, t in params])
        any_bad = bad_P.any().to(torch.int32)
        if trainer.world_size > 1:
            any_bad = trainer.strategy.reduce(any_bad, reduce_op="max")
        if not bool(any_bad):
            return
        names = [name for (name, _), bad in zip(params, bad_P.tolist(), strict=True) if bad]
        where = f"{names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "") if names else "another rank"
        raise NonFiniteError(
            f"refusing to write a checkpoint at step {trainer.global_step}: non-finite weights ({where}). The run "
            "diverged; lower the learning rate (model.init_args.lr) or resume from an earlier checkpoint"
        )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)


def _priority(name: str) -> tuple[int, int]:
    """Order of blame among terms non-finite at the same step: router terms, task terms, loss, gradients."""
    if "@" in name:
        return (0, 0)
    if name == _LOSS:
        return (2, 0)
    if name == _GRAD_NORM:
        return (3, 0)
    return (1, 0)
