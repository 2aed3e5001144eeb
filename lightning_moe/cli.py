"""The ``lightning-moe`` command line.

``lightning-moe fit|validate|test|predict -c recipes/<recipe>.yaml`` is a LightningCLI whose model
and data are given by ``class_path`` in the recipe; ``lightning-moe translate --ckpt PATH
--tgt-lang de [TEXT ...]`` loads a checkpoint (a Lightning checkpoint or a consolidated
expert-parallel one) and translates; ``lightning-moe prune`` and ``lightning-moe aggregate`` edit
checkpoints (:mod:`lightning_moe.surgery.commands`); ``lightning-moe estimate-memory -c RECIPE``
prints the memory a recipe needs per GPU (:mod:`lightning_moe.strategy.memory_command`);
``lightning-moe convert`` moves models between Hugging Face directories and checkpoints
(:mod:`lightning_moe.hf.convert_command`) and ``lightning-moe upcycle`` turns a dense model into an
MoE one (:mod:`lightning_moe.surgery.upcycle_command`).
``python -m lightning_moe`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Model-surgery commands and their entry points in :mod:`lightning_moe.surgery.commands`.
SURGERY_COMMANDS = {"prune": "prune_main", "aggregate": "aggregate_main"}


class MoECLI(LightningCLI):
    """LightningCLI that tells the user where the checkpoint, metrics and logs of a run went."""

    @override
    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = ["", "Run finished."]
        callback = trainer.checkpoint_callback
        best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
        if best:
            lines.append(f"  checkpoint (best): {best}")
            if callback.last_model_path:
                lines.append(f"  checkpoint (last): {callback.last_model_path}")
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            lines.append(f"  {type(logger).__name__} logs: {log_dir}")
            metrics = Path(str(log_dir)) / "metrics.csv"
            if metrics.exists():
                lines.append(f"  metrics: {metrics}")
        for key in ("val/bleu", "val/chrf", "val/loss", "val/ppl"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                lines.append(f"  {key} = {float(value):.4f}")
        if best and hasattr(self.model, "translate"):
            lines.append(f'  translate: lightning-moe translate --ckpt {best} --tgt-lang de "Hello"')
        print("\n".join(lines))

    def after_predict(self) -> None:
        """Print the predictions (for translation: one translated sentence per line)."""
        if not self.trainer.is_global_zero:
            return
        for batch in self.trainer.predict_loop.predictions or []:
            for item in batch if isinstance(batch, list) else [batch]:
                print(item)


def run_cli(args: Sequence[str]) -> MoECLI:
    """Run one LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    return MoECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and evaluate lightning_moe models from a YAML recipe."},
    )


def _translate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe translate",
        description="Translate text with a trained MultitaskTranslationModule checkpoint.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint: a .ckpt file, or an expert-sharded checkpoint directory"
    )
    parser.add_argument("--tgt-lang", required=True, help="target language code, e.g. de")
    parser.add_argument("--beam-size", type=int, default=4, help="beam width (1 = greedy); default 4")
    parser.add_argument("--max-length", type=int, default=None, help="maximum output tokens")
    parser.add_argument("text", nargs="*", help="sentences to translate; read from stdin (one per line) if none")
    return parser


def translate_main(argv: Sequence[str]) -> int:
    """``lightning-moe translate``: load a checkpoint and translate sentences.

    Returns:
        The process exit code.
    """
    args = _translate_parser().parse_args(list(argv))
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        print(
            f"error: checkpoint {str(ckpt)!r} does not exist; pass --ckpt with the path of a .ckpt file",
            file=sys.stderr,
        )
        return 2
    from lightning_moe.modules.translation import MultitaskTranslationModule
    from lightning_moe.strategy.checkpoint import consolidate_checkpoint, is_sharded_checkpoint

    if is_sharded_checkpoint(ckpt):
        # An expert-sharded directory from ExpertParallelStrategy: merge it into one file first.
        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "consolidated.ckpt"
            consolidate_checkpoint(ckpt, merged, weights_only_model=True)
            module = MultitaskTranslationModule.from_checkpoint(str(merged))
    else:
        module = MultitaskTranslationModule.from_checkpoint(str(ckpt))
    languages = list(module.tokenizer.languages)
    if args.tgt_lang not in languages:
        print(
            f"error: --tgt-lang {args.tgt_lang!r} is not a language of this model; choose one of {sorted(languages)}",
            file=sys.stderr,
        )
        return 2
    texts = list(args.text) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    kwargs = {"beam_size": args.beam_size}
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    for line in module.translate(texts, args.tgt_lang, **kwargs):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-moe`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "translate":
        raise SystemExit(translate_main(args[1:]))
    if args and args[0] in SURGERY_COMMANDS:
        from lightning_moe.surgery import commands

        raise SystemExit(getattr(commands, SURGERY_COMMANDS[args[0]])(args[1:]))
    if args and args[0] == "convert":
        from lightning_moe.hf.convert_command import main as convert_main

        raise SystemExit(convert_main(args[1:]))
    if args and args[0] == "upcycle":
        from lightning_moe.surgery.upcycle_command import main as upcycle_main

        raise SystemExit(upcycle_main(args[1:]))
    if args and args[0] == "estimate-memory":
        from lightning_moe.strategy.memory_command import main as estimate_memory_main

        raise SystemExit(estimate_memory_main(args[1:]))
    if args and args[0] == "consolidate":
        from lightning_moe.strategy.consolidate import main as consolidate_main

        consolidate_main(args[1:])
        return
    run_cli(args)
