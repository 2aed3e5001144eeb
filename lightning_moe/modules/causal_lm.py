"""LightningModule that fine-tunes (or trains) a :class:`~lightning_moe.models.MoEDecoder`, e.g. a Hugging Face MoE model.

Legend: B batch, T positions, V vocabulary.

With ``pretrained`` (a local Hugging Face directory) the weights are read in two steps so that no
rank holds every expert: :meth:`CausalLMModule.configure_model` builds the model with its expert
weights unallocated (untouched host memory) and reads every other tensor; the strategy then shards
the experts (:class:`~lightning_moe.ExpertParallelStrategy`); at the start of fit/validate/test
each rank reads its own experts. A checkpoint (``fit --ckpt_path``) replaces all of it. With
``save_hf_dir`` the fine-tuned model is written back as a Hugging Face directory when fit ends
(at the end of training, before the strategy's teardown: each expert-parallel rank writes its
own experts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from typing_extensions import override

from lightning_moe.io.checkpoint_loader import record_module
from lightning_moe.models import DecoderConfig, MoEDecoder
from lightning_moe.modules.optim import SCHEDULES, adamw_from_hparams

IGNORE_INDEX = -100


class CausalLMModule(LightningModule):
    """Next-token training of a :class:`~lightning_moe.models.MoEDecoder` on ``{"input_ids", "labels"}`` batches.

    Loss: token cross-entropy (labels of -100 ignored) plus the MoE aux losses. Logged:
    ``train/loss``, ``train/ce``, ``train/aux_loss``, ``train/lr``; ``val/loss`` and ``val/ppl``.
    Routers with ``bias_update_rate > 0`` get the :class:`~lightning_moe.callbacks.ExpertBiasUpdate`
    callback automatically.

    Args:
        pretrained: a local Hugging Face model directory (``config.json`` + safetensors) whose
            weights start the training, and whose config is used when ``config`` is None.
        config: the model configuration (:class:`~lightning_moe.models.DecoderConfig`); ``None``
            takes ``pretrained``'s. Checkpoints store the resolved config, so they load without
            the directory.
        config_overrides: :class:`~lightning_moe.models.DecoderConfig` fields to change, e.g.
            ``{capacity_factor: 1.25, aux_loss_weight: 0.01, moe_backend: triton}``.
        save_hf_dir: write the model as a Hugging Face directory here when fit ends (tokenizer
            files copied from ``pretrained``) at the end of training; ``None`` writes nothing.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        betas: AdamW betas.
        adam_eps: AdamW epsilon.
        warmup_steps: linear warmup steps.
        schedule: ``"cosine"``, ``"inverse_sqrt"`` or ``"constant"``.
        max_steps: cosine schedule length; ``None`` uses the Trainer's estimate.
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.

    Raises:
        ValueError: if neither ``pretrained`` nor ``config`` is given, or on an invalid setting.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: DecoderConfig | None = None,
        config_overrides: dict[str, Any] | None = None,
        save_hf_dir: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        schedule: str = "constant",
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if config is None:
            if pretrained is None:
                raise ValueError("pass pretrained (a Hugging Face model directory) or config (a DecoderConfig)")
            from lightning_moe.hf import hf_decoder_config

            config = hf_decoder_config(pretrained)
        if isinstance(config, dict):
            config = DecoderConfig(**config)
        self.model_config = dataclasses.replace(config, **(config_overrides or {}))
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        self.save_hyperparameters(ignore=["config", "config_overrides"])
        self.hparams["config"] = dataclasses.asdict(self.model_config)  # resolved: loads without the directory
        self.hparams["config_overrides"] = None
        self.pretrained = pretrained
        self.model: MoEDecoder | None = None
        self._experts_pending = False  # expert weights still to be read from ``pretrained``
        self._eval_sums: Tensor | None = None

    @override
    def configure_model(self) -> None:
        """Build the model; with ``pretrained``, read every non-expert tensor now and the experts after sharding."""
        if self.model is not None:
            return
        if self.pretrained is None:
            self.model = MoEDecoder(self.model_config)
            return
        from lightning_moe.hf import load_hf_weights

        with torch.device("meta"):
            model = MoEDecoder(self.model_config)
        # On the host whatever the default device: expert tensors stay unwritten (no memory is touched)
        # until the strategy has kept each rank's slice.
        model.to_empty(device="cpu")
        load_hf_weights(model, self.pretrained, experts=False)
        self.model = model
        self._experts_pending = True

    def _load_pending_experts(self) -> None:
        if self._experts_pending and self.model is not None and self.pretrained is not None:
            from lightning_moe.hf import load_hf_weights

            load_hf_weights(self.model, self.pretrained, non_experts=False)
            self._experts_pending = False

    @override
    def on_fit_start(self) -> None:
        self._load_pending_experts()

    @override
    def on_validation_start(self) -> None:
        self._load_pending_experts()

    @override
    def on_test_start(self) -> None:
        self._load_pending_experts()

    @override
    def on_predict_start(self) -> None:
        self._load_pending_experts()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint holds the weights and the resolved config: loading it needs no directory.
        checkpoint.setdefault("hyper_parameters", {})["pretrained"] = None
        record_module(checkpoint, self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._experts_pending = False  # the checkpoint's weights win

    @override
    def on_train_end(self) -> None:
        # Before the strategy's teardown gathers the experts: each expert-parallel rank writes its own.
        save_dir = self.hparams.get("save_hf_dir")
        if save_dir and self.model is not None:
            from lightning_moe.hf import save_hf_model

            save_hf_model(self.model, save_dir, tokenizer_dir=self.pretrained)

    @override
    def configure_callbacks(self) -> list[Callback]:
        from lightning_moe.callbacks import ExpertBiasUpdate

        return [ExpertBiasUpdate()] if self.model_config.bias_update_rate > 0 else []

    def _require_model(self) -> MoEDecoder:
        if self.model is None:
            raise RuntimeError("the model is not built yet; run it through a Trainer or call configure_model()")
        return self.model

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits ``[B, T, V]``."""
        return self._require_model()(input_ids)

    def _token_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits_BTV = self._require_model()(batch["input_ids"])
        labels = batch["labels"]
        nll = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, (labels != IGNORE_INDEX).sum()

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        nll, num_tokens = self._token_nll(batch)
        ce = nll / num_tokens.clamp_min(1)
        aux = self._require_model().moe_aux_loss()
        batch_size = batch["input_ids"].shape[0]
        for name, value in (("loss", ce + aux), ("ce", ce), ("aux_loss", aux)):
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        # The parts ride along (detached) for callbacks such as NonFiniteGuard, which checks each one.
        return {"loss": ce + aux, "ce": ce.detach(), "aux_loss": aux.detach()}

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        nll, num_tokens = self._token_nll(batch)
        sums = torch.stack([nll.double(), num_tokens.double()])
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    @override
    def on_validation_epoch_end(self) -> None:
        sums = self._eval_sums
        self._eval_sums = None
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self._trainer is not None else sums
        loss = float(sums[0] / sums[1].clamp_min(1))
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=True)

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return adamw_from_hparams(
            self._require_model(), self.hparams, lambda: int(self.trainer.estimated_stepping_batches)
        )


__all__ = ["CausalLMModule"]
