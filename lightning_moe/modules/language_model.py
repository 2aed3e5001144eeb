"""LightningModule for the decoder-only MoE language model.

Legend: B batch, T positions, V vocabulary.

The model is built once the vocabulary size is known: ``vocab_size=``, the datamodule's
``vocab_size`` in :meth:`LanguageModelModule.configure_model`, or a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from typing_extensions import override

from lightning_moe.io.checkpoint_loader import record_module
from lightning_moe.models import GPT, GPTConfig
from lightning_moe.modules.optim import SCHEDULES, adamw_from_hparams
from lightning_moe.modules.tokenizer_state import tokenizer_from_state, tokenizer_to_state

_CHECKPOINT_KEY = "lightning_moe"
IGNORE_INDEX = -100


class LanguageModelModule(LightningModule):
    """Train and evaluate a :class:`~lightning_moe.models.GPT` on ``{"input_ids", "labels"}`` batches.

    Loss: next-token cross-entropy (labels equal to -100 are ignored) plus the MoE aux losses
    summed over layers. Logged: ``train/loss`` (= ``train/ce`` + ``train/aux_loss``), ``train/ce``,
    ``train/aux_loss``, ``train/lr``; ``val/loss`` (token cross-entropy) and ``val/ppl`` (its
    exponential); the same with ``test/``.

    Args:
        d_model: model width.
        n_heads: attention heads.
        d_ff: dense FFN hidden width.
        n_layers: decoder blocks.
        dropout: dropout probability.
        max_positions: longest sequence.
        positions: ``"learned"`` or ``"sinusoidal"``.
        activation: ``"gelu"``, ``"relu"`` or ``"swiglu"`` (dense and expert FFNs).
        moe_every: every ``moe_every``-th FFN is MoE (2: every other); 0 is dense.
        moe_layers: explicit MoE layer indices (overrides ``moe_every``).
        num_experts: experts per MoE layer; 0 is dense.
        top_k: experts per token.
        capacity_factor: training capacity factor; ``None`` is dropless.
        eval_capacity_factor: eval (validation, decoding) capacity factor; ``None`` is dropless.
        min_capacity: lower bound on slots per expert.
        random_token_selection: Random Token Selection in training.
        router_jitter: multiplicative router input jitter epsilon.
        aux_loss_weight: weight of each layer's load-balancing loss.
        z_loss_weight: weight of each layer's router z-loss.
        moe_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        expert_ffn_size: expert hidden width; ``None`` uses ``d_ff``.
        num_shared_experts: shared experts per MoE layer.
        vocab_size: build the model now with this vocabulary; ``None`` takes the datamodule's
            ``vocab_size`` at fit time. Not a saved hyperparameter (the checkpoint carries it).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        betas: AdamW betas.
        adam_eps: AdamW epsilon.
        warmup_steps: linear warmup steps.
        schedule: ``"cosine"``, ``"inverse_sqrt"`` or ``"constant"``, stepped every optimizer step.
        max_steps: cosine schedule length; ``None`` uses the Trainer's estimate.
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.

    Raises:
        ValueError: on an invalid setting, naming the value and the fix.
    """

    def __init__(
        self,
        d_model: int = 768,
        n_heads: int = 12,
        d_ff: int = 3072,
        n_layers: int = 12,
        dropout: float = 0.0,
        max_positions: int = 1024,
        positions: str = "learned",
        activation: str = "gelu",
        moe_every: int = 2,
        moe_layers: list[int] | None = None,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        random_token_selection: bool = True,
        router_jitter: float = 0.0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        moe_backend: str = "auto",
        expert_ffn_size: int | None = None,
        num_shared_experts: int = 0,
        vocab_size: int | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        warmup_steps: int = 1000,
        schedule: str = "cosine",
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vocab_size"])  # the datamodule owns the vocab_size hparam
        self._model_kwargs: dict[str, Any] = {
            "d_model": d_model, "n_heads": n_heads, "d_ff": d_ff, "n_layers": n_layers, "dropout": dropout,
            "max_positions": max_positions, "positions": positions, "activation": activation,
            "moe_every": moe_every, "moe_layers": None if moe_layers is None else list(moe_layers),
            "num_experts": num_experts, "top_k": top_k, "capacity_factor": capacity_factor,
            "eval_capacity_factor": eval_capacity_factor, "min_capacity": min_capacity,
            "random_token_selection": random_token_selection, "router_jitter": router_jitter,
            "aux_loss_weight": aux_loss_weight, "z_loss_weight": z_loss_weight, "moe_backend": moe_backend,
            "expert_ffn_size": expert_ffn_size, "num_shared_experts": num_shared_experts,
        }  # fmt: skip
        GPTConfig(vocab_size=vocab_size or 1, **self._model_kwargs)  # validate now, not at fit time
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        self.model: GPT | None = None
        self.tokenizer: Any = None
        self._eval_sums: Tensor | None = None  # [2]: summed token NLL, token count of this eval epoch
        if vocab_size is not None:
            self.model = GPT(GPTConfig(vocab_size=vocab_size, **self._model_kwargs))

    def config(self, vocab_size: int) -> GPTConfig:
        """The model configuration for ``vocab_size``."""
        return GPTConfig(vocab_size=vocab_size, **self._model_kwargs)

    def _build(self, vocab_size: int) -> None:
        if self.model is None:
            self.model = GPT(self.config(vocab_size))
        elif self.model.config.vocab_size != vocab_size:
            raise ValueError(
                f"the model has vocab_size={self.model.config.vocab_size} but the data has {vocab_size}; "
                "use the datamodule/tokenizer the model was built with"
            )

    @override
    def configure_model(self) -> None:
        """Build the model from the datamodule's ``vocab_size`` (and keep its ``tokenizer``, if any)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return  # load_from_checkpoint calls this before on_load_checkpoint builds the model
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        vocab_size = getattr(datamodule, "vocab_size", None)
        if vocab_size is not None:
            self._build(int(vocab_size))

    def _sync_finished(self) -> Callable[[bool], bool] | None:
        """With several processes, agree on when generation stops (MoE layers exchange tokens)."""
        if self._trainer is None or self.trainer.world_size <= 1 or not dist.is_initialized():
            return None
        strategy = self.trainer.strategy
        return lambda done: bool(strategy.reduce_boolean_decision(done, all=True))

    def _require_model(self) -> GPT:
        if self.model is None:
            raise RuntimeError(
                "the model is not built yet; pass vocab_size=..., or run it through a Trainer with a datamodule "
                "that has a vocab_size"
            )
        return self.model

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "tokenizer": None if self.tokenizer is None else tokenizer_to_state(self.tokenizer),
            "vocab_size": None if self.model is None else self.model.config.vocab_size,
        }
        record_module(checkpoint, self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY, {})
        if saved.get("vocab_size") is not None:
            self._build(int(saved["vocab_size"]))
        if saved.get("tokenizer") is not None:  # the weights' tokenizer (a datamodule restores it too)
            self.tokenizer = tokenizer_from_state(saved["tokenizer"])

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits ``[B, T, V]``."""
        return self._require_model()(input_ids)

    def _token_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed token cross-entropy and the number of counted tokens."""
        logits_BTV = self._require_model()(batch["input_ids"])
        labels = batch["labels"]
        nll = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, (labels != IGNORE_INDEX).sum()

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The training objective of ``batch`` and its parts.

        Returns:
            ``{"loss": ce + aux_loss, "ce": token cross-entropy, "aux_loss": MoE aux losses summed over layers}``.
        """
        nll, num_tokens = self._token_nll(batch)
        ce = nll / num_tokens.clamp_min(1)
        aux = self._require_model().moe_aux_loss()
        return {"loss": ce + aux, "ce": ce, "aux_loss": aux}

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.training_losses(batch)
        batch_size = batch["input_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        # The parts ride along (detached) for callbacks such as NonFiniteGuard, which checks each one.
        return {name: value if name == "loss" else value.detach() for name, value in losses.items()}

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        nll, num_tokens = self._token_nll(batch)
        sums = torch.stack([nll.double(), num_tokens.double()])
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        sums = (
            self._eval_sums if self._eval_sums is not None else torch.zeros(2, dtype=torch.float64, device=self.device)
        )
        if self.trainer.world_size > 1:  # every process reduces once, then logs the same numbers
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self._eval_sums = None
        if sums[1] > 0:
            loss = float(sums[0] / sums[1])
            self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
            self.log(f"{prefix}/ppl", math.exp(min(loss, 50.0)), sync_dist=True)

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return adamw_from_hparams(
            self._require_model(), self.hparams, lambda: int(self.trainer.estimated_stepping_batches)
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        lang: str | None = None,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> str:
        """Continue ``prompt`` (text; needs a tokenizer) and return the new text.

        Args:
            prompt: text to continue.
            lang: language of the text; its ``<2xx>`` tag is put first, as in the training stream
                of :class:`~lightning_moe.data.language_modeling.LanguageModelDataModule`.
            max_new_tokens: tokens to generate at most (stops at ``</s>``).
            temperature: sampling temperature; 0 is greedy.
            top_k: sample among the ``top_k`` most likely tokens.

        Returns:
            The generated continuation, detokenized.
        """
        model = self._require_model()
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: train on text data or load a checkpoint that has one")
        tok = self.tokenizer
        prefix = [] if lang is None else [tok.lang_token_id(lang)]
        ids = torch.tensor([[*prefix, *tok.encode(prompt)]], dtype=torch.long, device=self.device)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tok.eos_id,
                sync_finished=self._sync_finished(),
            )  # fmt: skip
        finally:
            model.train(was_training)
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        return tok.decode(new)


__all__ = ["LanguageModelModule"]
