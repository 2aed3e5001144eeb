"""``ExpertBiasUpdate``: aux-loss-free balancing of the routers' correction biases after each optimizer step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_moe.moe.balancing import balanced_routers, update_expert_biases


class ExpertBiasUpdate(Callback):
    """Update every router correction bias (``bias_update_rate > 0``) once per optimizer step.

    The update (:func:`~lightning_moe.moe.update_expert_biases`) uses the expert loads summed over
    every rank, so all replicas keep the same biases. With gradient accumulation it runs once per
    optimizer step, on the loads of all its micro-batches. Works with any model built from
    :class:`~lightning_moe.MoE` layers (the M3 and GPT recipes too: set ``expert_bias: true`` and
    ``bias_update_rate`` in the model config and add this callback).

    Example:
        >>> trainer = Trainer(callbacks=[ExpertBiasUpdate()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_step = -1

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        if not balanced_routers(pl_module):
            return

        def all_reduce_sum(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        update_expert_biases(pl_module, all_reduce_sum)


__all__ = ["ExpertBiasUpdate"]
