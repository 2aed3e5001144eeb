"""LightningModule for multitask multilingual MoE translation (Kim et al. 2021, Z-code M3).

Legend: B batch, S source positions, L target positions, V vocabulary.

The model is built once the tokenizer is known: from the datamodule's ``tokenizer`` in
:meth:`MultitaskTranslationModule.configure_model`, from a checkpoint in ``on_load_checkpoint``,
or explicitly with :meth:`MultitaskTranslationModule.attach_tokenizer`. The tokenizer travels
inside every checkpoint, so a checkpoint alone can translate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from typing_extensions import override

from lightning_moe.io.checkpoint_loader import record_module
from lightning_moe.models import EncoderDecoderTransformer, TransformerConfig, beam_search, greedy_search
from lightning_moe.modules.losses import label_smoothed_nll
from lightning_moe.modules.optim import SCHEDULES, adamw_from_hparams
from lightning_moe.modules.tokenizer_state import tokenizer_from_state, tokenizer_to_state
from lightning_moe.modules.translation_metrics import CorpusStatistics, translation_scores

_CHECKPOINT_KEY = "lightning_moe"


class MultitaskTranslationModule(LightningModule):
    """Train, evaluate and run a multilingual :class:`~lightning_moe.models.EncoderDecoderTransformer`.

    Batches are dicts with ``src_ids [B, S]``, ``tgt_in [B, L]``, ``tgt_out [B, L]`` (padded with
    the tokenizer's ``pad_id``) and ``direction [B]`` (index into ``directions``). The training
    loss is label-smoothed cross-entropy over non-padding target tokens plus the MoE aux losses
    summed over layers.

    Logged: ``train/loss`` (= ``train/ce`` + ``train/aux_loss``), ``train/ce`` (label-smoothed),
    ``train/nll``, ``train/aux_loss``, ``train/lr``; ``val/loss`` (token NLL without smoothing) and
    ``val/ppl`` overall and ``val/loss_<direction>`` per direction; at the end of validation, for a
    fixed subset of each direction, ``val/bleu``, ``val/chrf`` and ``val/chrfpp`` and per direction
    ``val/bleu_<direction>``, ``val/chrf_<direction>``, ``val/chrfpp_<direction>`` from beam search,
    and the same with ``_greedy`` for greedy search (``val/bleu_greedy`` ...). Test uses the
    ``test/`` prefix.

    BLEU, chrF and chrF++ are sacreBLEU's (:mod:`lightning_moe.modules.translation_metrics`): corpus
    BLEU with the ``13a`` tokenizer (``zh`` for Chinese, ``char`` for Japanese and Thai), chrF
    (character 6-grams, beta 2) as ``chrf`` and chrF++ (plus word 2-grams) as ``chrfpp``, on a 0-100
    scale. Per direction each is the corpus score of that direction's sentences; ``val/bleu`` is
    corpus BLEU over every direction's sentences pooled (their n-gram statistics summed),
    ``val/chrf`` and ``val/chrfpp`` the mean over directions.

    Args:
        d_model: model width.
        n_heads: attention heads.
        d_ff: dense FFN hidden width.
        n_encoder_layers: encoder blocks.
        n_decoder_layers: decoder blocks.
        dropout: dropout probability.
        max_positions: longest source or target sequence; longer sources are truncated in
            :meth:`translate`.
        positions: ``"sinusoidal"`` or ``"learned"``.
        activation: ``"gelu"``, ``"relu"`` or ``"swiglu"`` (dense and expert FFNs).
        moe_every: every ``moe_every``-th FFN is MoE (2: every other); 0 is dense.
        moe_encoder_layers: explicit encoder MoE layer indices (overrides ``moe_every``).
        moe_decoder_layers: explicit decoder MoE layer indices (overrides ``moe_every``).
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
        vocab_size: build the model now with this vocabulary size (e.g. linked from
            ``data.vocab_size`` in a LightningCLI); ``None`` (the usual choice) builds it from the
            tokenizer. Not a saved hyperparameter: checkpoints carry the tokenizer instead.
        label_smoothing: label smoothing epsilon in ``[0, 1)``.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        betas: AdamW betas.
        adam_eps: AdamW epsilon.
        warmup_steps: linear warmup steps.
        schedule: ``"inverse_sqrt"``, ``"cosine"`` or ``"constant"``, stepped every optimizer step.
        max_steps: cosine schedule length; ``None`` uses the Trainer's estimate.
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.
        beam_size: beam of evaluation decoding and of :meth:`translate`.
        length_penalty: beam search length penalty exponent.
        num_eval_examples: sentences decoded per direction at the end of validation (0: none).
        eval_max_length: most generated tokens per sentence.
        eval_batch_size: sentences decoded per batch.

    Raises:
        ValueError: on an invalid setting, naming the value and the fix.
    """

    def __init__(
        self,
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 2048,
        n_encoder_layers: int = 6,
        n_decoder_layers: int = 6,
        dropout: float = 0.1,
        max_positions: int = 512,
        positions: str = "sinusoidal",
        activation: str = "gelu",
        moe_every: int = 2,
        moe_encoder_layers: list[int] | None = None,
        moe_decoder_layers: list[int] | None = None,
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
        label_smoothing: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        adam_eps: float = 1e-8,
        warmup_steps: int = 4000,
        schedule: str = "inverse_sqrt",
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        num_eval_examples: int = 64,
        eval_max_length: int = 128,
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__()
        # vocab_size stays out of hparams: the datamodule has a vocab_size hparam too, and Lightning
        # refuses to log two different values under one key.
        self.save_hyperparameters(ignore=["vocab_size"])
        self._model_kwargs: dict[str, Any] = {
            "d_model": d_model, "n_heads": n_heads, "d_ff": d_ff, "n_encoder_layers": n_encoder_layers,
            "n_decoder_layers": n_decoder_layers, "dropout": dropout, "max_positions": max_positions,
            "positions": positions, "activation": activation, "moe_every": moe_every,
            "moe_encoder_layers": None if moe_encoder_layers is None else list(moe_encoder_layers),
            "moe_decoder_layers": None if moe_decoder_layers is None else list(moe_decoder_layers),
            "num_experts": num_experts, "top_k": top_k, "capacity_factor": capacity_factor,
            "eval_capacity_factor": eval_capacity_factor, "min_capacity": min_capacity,
            "random_token_selection": random_token_selection, "router_jitter": router_jitter,
            "aux_loss_weight": aux_loss_weight, "z_loss_weight": z_loss_weight, "moe_backend": moe_backend,
            "expert_ffn_size": expert_ffn_size, "num_shared_experts": num_shared_experts,
        }  # fmt: skip
        TransformerConfig(vocab_size=vocab_size or 1, **self._model_kwargs)  # validate now, not at fit time
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1); 0.1 is typical, 0 turns it off")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
        if beam_size < 1:
            raise ValueError(f"beam_size={beam_size} must be >= 1; use 1 for greedy decoding")
        for name, value in (("num_eval_examples", num_eval_examples), ("warmup_steps", warmup_steps)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if eval_max_length < 1 or eval_batch_size < 1:
            raise ValueError(f"eval_max_length={eval_max_length} and eval_batch_size={eval_batch_size} must be >= 1")
        self.model: EncoderDecoderTransformer | None = None
        self.tokenizer: Any = None
        self.directions: list[str] = []
        self._eval_sums: Tensor | None = None  # [directions, 2]: NLL sum, token count of this eval epoch
        if vocab_size is not None:
            self.model = EncoderDecoderTransformer(self.config(vocab_size))

    # ------------------------------------------------------------------ building

    def config(self, vocab_size: int | None = None) -> TransformerConfig:
        """The model configuration (``vocab_size`` defaults to the built model's or the tokenizer's)."""
        if vocab_size is None:
            if self.model is not None:
                vocab_size = self.model.config.vocab_size
            elif self.tokenizer is not None:
                vocab_size = int(self.tokenizer.vocab_size)
            else:
                raise RuntimeError("vocab_size is unknown; attach a tokenizer first (attach_tokenizer)")
        return TransformerConfig(vocab_size=vocab_size, **self._model_kwargs)

    def attach_tokenizer(self, tokenizer: Any, directions: list[str] | None = None) -> None:
        """Set the tokenizer (and the direction names), and build the model if it is not built yet.

        Args:
            tokenizer: an object with ``encode``, ``decode``, ``lang_token_id``, ``pad_id``, ``bos_id``,
                ``eos_id``, ``vocab_size``, ``to_dict`` and a ``from_dict`` classmethod
                (:class:`lightning_moe.data.tokenizer.Tokenizer`).
            directions: names like ``"en-de"``; batch ``direction`` values index this list.

        Raises:
            ValueError: if the built model's vocabulary size differs from the tokenizer's.
        """
        vocab_size = int(tokenizer.vocab_size)
        if self.model is not None and self.model.config.vocab_size != vocab_size:
            raise ValueError(
                f"the model has vocab_size={self.model.config.vocab_size} but the tokenizer has {vocab_size}; "
                "use the tokenizer the model was built with (it is saved in every checkpoint)"
            )
        self.tokenizer = tokenizer
        if directions is not None:
            self.directions = list(directions)
        if self.model is None:
            self.model = EncoderDecoderTransformer(self.config(vocab_size))

    @override
    def configure_model(self) -> None:
        """Build the model from the datamodule's tokenizer (``trainer.datamodule.tokenizer``), if there is one."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            directions = getattr(datamodule, "directions", None)
            if self.tokenizer is not None and tokenizer_to_state(self.tokenizer) != tokenizer_to_state(tokenizer):
                raise ValueError(
                    "the datamodule's tokenizer differs from the one this module was built with (e.g. from a "
                    "checkpoint); point the datamodule at the tokenizer saved with the model"
                )
            self.attach_tokenizer(tokenizer, None if directions is None else list(directions))
        # Without a tokenizer the model stays unbuilt here: load_from_checkpoint calls this hook
        # before on_load_checkpoint, which builds it from the saved tokenizer.

    def _require_model(self) -> EncoderDecoderTransformer:
        if self.model is None:
            raise RuntimeError(
                "the model is not built yet; call attach_tokenizer(tokenizer), or run it through a Trainer with "
                "a datamodule that has a tokenizer"
            )
        return self.model

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached; call attach_tokenizer(tokenizer) or load a checkpoint")
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        """Padding id of the tokenizer (0 when no tokenizer is attached)."""
        return 0 if self.tokenizer is None else int(self.tokenizer.pad_id)

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "tokenizer": None if self.tokenizer is None else tokenizer_to_state(self.tokenizer),
            "directions": list(self.directions),
            "vocab_size": None if self.model is None else self.model.config.vocab_size,
        }
        record_module(checkpoint, self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY, {})
        tokenizer_state = saved.get("tokenizer")
        if tokenizer_state is not None:
            restored = tokenizer_from_state(tokenizer_state)  # a legacy one is converted: compare tokenizers
            if self.tokenizer is not None and restored != self.tokenizer and not self._datamodule_restores(checkpoint):
                raise ValueError(
                    "the checkpoint's tokenizer differs from the datamodule's; point the datamodule at the "
                    "tokenizer saved with the checkpoint (or train a new model)"
                )
            self.attach_tokenizer(restored, saved.get("directions") or None)
        elif self.model is None and saved.get("vocab_size") is not None:
            self.model = EncoderDecoderTransformer(self.config(int(saved["vocab_size"])))
        if saved.get("directions") and not self.directions:
            self.directions = list(saved["directions"])

    def _datamodule_restores(self, checkpoint: dict[str, Any]) -> bool:
        """Whether the Trainer's datamodule adopts the checkpoint's tokenizer next (its saved state has one).

        Lightning restores the module before the datamodule: when the datamodule trained its own
        tokenizer (e.g. a different one than an older version's, whose checkpoint is being resumed or
        validated) and will switch to the saved one, the module switches now.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        state = checkpoint.get(type(datamodule).__qualname__) if datamodule is not None else None
        return isinstance(state, dict) and state.get("tokenizer") is not None and hasattr(datamodule, "load_state_dict")

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> MultitaskTranslationModule:
        """Load a checkpoint for inference: model, tokenizer and directions, in eval mode.

        Args:
            path: a ``.ckpt`` written by the Trainer.
            map_location: device to load the weights onto.

        Returns:
            The module, ready for :meth:`translate`.
        """
        module = cls.load_from_checkpoint(path, map_location=map_location)
        module.eval()
        return module

    # ------------------------------------------------------------------ training

    def _forward_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token smoothed loss and NLL ``[B, L]`` and the mask of counted target tokens."""
        model = self._require_model()
        pad = self.pad_id
        src, tgt_in, tgt_out = batch["src_ids"], batch["tgt_in"], batch["tgt_out"]
        logits_BLV = model(src, tgt_in, src == pad, tgt_in == pad)
        return label_smoothed_nll(logits_BLV, tgt_out, self.hparams["label_smoothing"], ignore_index=pad)

    @override
    def forward(self, src_ids: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, L, V]`` (padding masks from the tokenizer's ``pad_id``)."""
        pad = self.pad_id
        return self._require_model()(src_ids, tgt_in, src_ids == pad, tgt_in == pad)

    def training_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The training objective of ``batch`` and its parts.

        Returns:
            Scalars averaged over the non-padding target tokens: ``loss`` (``ce + aux_loss``), ``ce``
            (label-smoothed cross-entropy), ``nll`` (unsmoothed) and ``aux_loss`` (the MoE aux losses
            summed over layers).
        """
        loss_BL, nll_BL, mask_BL = self._forward_losses(batch)
        num_tokens = mask_BL.sum().clamp_min(1)
        ce = loss_BL.sum() / num_tokens
        aux = self._require_model().moe_aux_loss()
        return {"loss": ce + aux, "ce": ce, "nll": nll_BL.sum() / num_tokens, "aux_loss": aux}

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.training_losses(batch)
        batch_size = batch["src_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        # The parts ride along (detached) for callbacks such as NonFiniteGuard, which checks each one.
        return {name: value if name == "loss" else value.detach() for name, value in losses.items()}

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return adamw_from_hparams(
            self._require_model(), self.hparams, lambda: int(self.trainer.estimated_stepping_batches)
        )

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        _, nll_BL, mask_BL = self._forward_losses(batch)
        num_directions = max(len(self.directions), 1)
        if self._eval_sums is None:
            self._eval_sums = torch.zeros(num_directions, 2, dtype=torch.float64, device=nll_BL.device)
        direction_B = batch.get("direction")
        if direction_B is None or not self.directions:
            direction_B = torch.zeros(nll_BL.shape[0], dtype=torch.long, device=nll_BL.device)
        sums_B2 = torch.stack([nll_BL.sum(1), mask_BL.sum(1)], dim=1).double()
        self._eval_sums.index_add_(0, direction_B.to(self._eval_sums.device), sums_B2)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    @override
    def on_validation_epoch_start(self) -> None:
        self._eval_sums = None

    @override
    def on_test_epoch_start(self) -> None:
        self._eval_sums = None

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_epoch_end(self, prefix: str) -> None:
        self._log_losses(prefix)
        if self.trainer.sanity_checking or self.hparams["num_eval_examples"] == 0 or self.tokenizer is None:
            return
        self._log_translation_scores(prefix)

    # Epoch-end values are identical on every process (sums are reduced first, every process decodes
    # the same sentences), so sync_dist=True only averages equal numbers.
    def _log_losses(self, prefix: str) -> None:
        num_directions = max(len(self.directions), 1)
        sums = self._eval_sums
        if sums is None:
            sums = torch.zeros(num_directions, 2, dtype=torch.float64, device=self.device)
        # Every process reduces exactly once, whatever directions its shard of the data held.
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        total_nll, total_tokens = sums[:, 0].sum(), sums[:, 1].sum()
        if total_tokens > 0:
            loss = float(total_nll / total_tokens)
            self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
            self.log(f"{prefix}/ppl", math.exp(min(loss, 50.0)), sync_dist=True)
        for i, direction in enumerate(self.directions):
            if sums[i, 1] > 0:
                self.log(f"{prefix}/loss_{direction}", float(sums[i, 0] / sums[i, 1]), sync_dist=True)
        self._eval_sums = None

    def _log_translation_scores(self, prefix: str) -> None:
        datamodule = self.trainer.datamodule
        examples_fn = getattr(datamodule, f"{prefix}_examples", None)
        if examples_fn is None and prefix == "test":
            examples_fn = getattr(datamodule, "val_examples", None)
        if examples_fn is None:
            return
        directions = getattr(datamodule, "translation_directions", None)
        if directions is None:  # denoising directions are named "xx-xx"
            directions = [d for d in self.directions if d.split("-")[0] != d.split("-")[-1]]
        searches = {"": self.hparams["beam_size"], "_greedy": 1}
        means: dict[str, dict[str, list[float]]] = {kind: {"chrf": [], "chrfpp": []} for kind in searches}
        pooled = {kind: CorpusStatistics() for kind in searches}
        for direction in directions:
            examples = examples_fn(direction, self.hparams["num_eval_examples"])
            if not examples:
                continue
            sources = [src for src, _ in examples]
            references = [ref for _, ref in examples]
            tgt_lang = direction.split("-")[-1]
            for kind, beam in searches.items():
                hypotheses = self._translate_ids(self._encode_sources(sources, tgt_lang), beam)
                scores = translation_scores(hypotheses, references, tgt_lang)
                pooled[kind].add(hypotheses, references, tgt_lang)
                for metric, value in scores.items():
                    self.log(f"{prefix}/{metric}{kind}_{direction}", value, sync_dist=True)
                    if metric in means[kind]:
                        means[kind][metric].append(value)
        for kind, by_metric in means.items():
            if not by_metric["chrf"]:
                continue
            for metric, values in by_metric.items():
                show = kind == "" and metric == "chrf"
                self.log(f"{prefix}/{metric}{kind}", sum(values) / len(values), prog_bar=show, sync_dist=True)
            # Corpus BLEU over every direction's sentences together: a few short sentences of one
            # direction rarely share 4-grams with their references.
            self.log(f"{prefix}/bleu{kind}", pooled[kind].bleu(), prog_bar=kind == "", sync_dist=True)

    # ------------------------------------------------------------------ inference

    def _encode_sources(self, texts: list[str], tgt_lang: str) -> list[list[int]]:
        """``[<2tgt>, *tokens, </s>]`` per text (the datamodule's source format), truncated to ``max_positions``."""
        tok = self._require_tokenizer()
        lang_id = tok.lang_token_id(tgt_lang)
        limit = self._model_kwargs["max_positions"] - 2
        return [[lang_id, *tok.encode(text)[:limit], tok.eos_id] for text in texts]

    def _translate_ids(self, sources: list[list[int]], beam_size: int, max_length: int | None = None) -> list[str]:
        """Decode token-id sources in batches; returns detokenized hypotheses in input order.

        Each source starts with its target-language tag, which also starts the decoder input.
        """
        model, tok = self._require_model(), self._require_tokenizer()
        max_length = max_length or self.hparams["eval_max_length"]
        max_length = min(max_length, self._model_kwargs["max_positions"] - 1)
        batch_size = self.hparams["eval_batch_size"]
        sync = self._sync_finished()
        was_training = model.training
        model.eval()
        outputs: list[str] = []
        try:
            for start in range(0, len(sources), batch_size):
                chunk = sources[start : start + batch_size]
                src = torch.full((len(chunk), max(map(len, chunk))), tok.pad_id, dtype=torch.long, device=self.device)
                for i, ids in enumerate(chunk):
                    src[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                common = {"start_id": src[:, 0], "eos_id": tok.eos_id, "pad_id": tok.pad_id, "max_length": max_length}
                if beam_size == 1:
                    out = greedy_search(model, src, sync_finished=sync, **common)
                else:
                    out = beam_search(
                        model, src, beam_size=beam_size, length_penalty=self.hparams["length_penalty"],
                        sync_finished=sync, **common,
                    )  # fmt: skip
                outputs.extend(self._detokenize(row) for row in out.tolist())
        finally:
            model.train(was_training)
        return outputs

    def _detokenize(self, ids: list[int]) -> str:
        tok = self._require_tokenizer()
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        return tok.decode([i for i in ids if i != tok.pad_id])

    def _sync_finished(self) -> Callable[[bool], bool] | None:
        """With several processes, agree on when decoding stops (MoE layers exchange tokens)."""
        if self._trainer is None or self.trainer.world_size <= 1 or not dist.is_initialized():
            return None
        strategy = self.trainer.strategy
        return lambda done: bool(strategy.reduce_boolean_decision(done, all=True))

    @torch.no_grad()
    def translate(
        self, texts: list[str], tgt_lang: str, beam_size: int | None = None, max_length: int | None = None
    ) -> list[str]:
        """Translate sentences into ``tgt_lang`` (the source language need not be given).

        Args:
            texts: source sentences.
            tgt_lang: target language code, e.g. ``"de"``.
            beam_size: beam width; ``None`` uses the module's ``beam_size``, 1 is greedy.
            max_length: most generated tokens; ``None`` uses ``eval_max_length``.

        Returns:
            The translations, in order; an empty (or whitespace-only) text translates to ``""``.

        Raises:
            ValueError: if the tokenizer has no tag for ``tgt_lang``.
        """
        beam = self.hparams["beam_size"] if beam_size is None else beam_size
        texts = list(texts)
        # An empty source has nothing to translate; decoding it would make the model invent a sentence.
        filled = [i for i, text in enumerate(texts) if text.strip()]
        outputs = [""] * len(texts)
        if filled:
            decoded = self._translate_ids(self._encode_sources([texts[i] for i in filled], tgt_lang), beam, max_length)
            for i, line in zip(filled, decoded, strict=True):
                outputs[i] = line
        return outputs

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Translate a batch: a dict with ``src_ids [B, S]`` (tagged, padded), or ``(texts, tgt_lang)``."""
        if isinstance(batch, dict):
            sources = [[i for i in row if i != self.pad_id] for row in batch["src_ids"].tolist()]
            return self._translate_ids(sources, self.hparams["beam_size"])
        texts, tgt_lang = batch
        return self.translate(list(texts), tgt_lang)


__all__ = ["MultitaskTranslationModule"]
