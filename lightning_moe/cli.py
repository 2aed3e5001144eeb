"""The ``lightning-moe`` command line (``python -m lightning_moe`` is the same command).

``lightning-moe fit|validate|test|predict -c recipes/<recipe>.yaml`` is a LightningCLI whose model
and data are given by ``class_path`` in the recipe; the other commands (:data:`COMMANDS`) are small
argparse programs: ``translate`` (here), ``consolidate`` (here, around
:func:`lightning_moe.strategy.checkpoint.consolidate_checkpoint`), ``prune`` and ``aggregate``
(:mod:`lightning_moe.surgery.commands`), ``upcycle`` (:mod:`lightning_moe.surgery.upcycle_command`),
``convert`` (:mod:`lightning_moe.hf.convert_command`) and ``estimate-memory``
(:mod:`lightning_moe.strategy.memory_command`).

Every command reads checkpoints through :mod:`lightning_moe.io.checkpoint_loader` (weights-only,
with the project's allowlist) and reports a bad checkpoint or a bad config value in one line with
exit code 2; a diverged run (:class:`~lightning_moe.callbacks.NonFiniteError`) exits with code 1.
``--debug`` (anywhere on the command line) or ``LIGHTNING_MOE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_moe.io.checkpoint_loader import CheckpointLoadError, checkpoint_file, load_checkpoint

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Model-surgery commands and their entry points in :mod:`lightning_moe.surgery.commands`.
SURGERY_COMMANDS = {"prune": "prune_main", "aggregate": "aggregate_main"}
#: Every command with its one-line description (``lightning-moe --help``).
COMMANDS = {
    "fit": "train from a YAML recipe: fit -c recipes/m3_tiny.yaml (--ckpt_path CKPT resumes a run)",
    "validate": "evaluate a checkpoint on the validation split: validate -c RECIPE --ckpt_path CKPT",
    "test": "evaluate a checkpoint on the test split: test -c RECIPE --ckpt_path CKPT",
    "predict": "translate the test split with a checkpoint, one line each: predict -c RECIPE --ckpt_path CKPT",
    "translate": 'translate sentences: translate --ckpt CKPT --tgt-lang de "Save changes"',
    "consolidate": "merge an expert-parallel checkpoint directory into one .ckpt file: consolidate DIR OUT.ckpt",
    "prune": "keep the N most-used experts of each MoE layer: prune --ckpt CKPT --keep N --out OUT.ckpt",
    "aggregate": "unite the experts of several checkpoints: aggregate --ckpt A --ckpt B --out OUT.ckpt",
    "upcycle": "turn a dense model into an MoE one: upcycle --ckpt DENSE --num-experts 8 --out OUT",
    "convert": "Hugging Face directory <-> checkpoint: convert --from-hf DIR --out CKPT | --ckpt CKPT --to-hf DIR",
    "estimate-memory": "memory per GPU of a recipe under ExpertParallelStrategy: estimate-memory -c RECIPE --devices N",
}
DEBUG_ENV = "LIGHTNING_MOE_DEBUG"
_FIELDS_HINT = (
    "List a model's or datamodule's fields with: lightning-moe fit --model.help MultitaskTranslationModule "
    "(or LanguageModelModule, CausalLMModule) and --data.help MultilingualDataModule; every value a recipe sets: "
    "lightning-moe fit -c RECIPE --print_config"
)
# Lightning's special ckpt_path values, resolved by the Trainer itself.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
# What `consolidate --weights-only` drops: the state only training needs.
_TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


class ConfigError(ValueError):
    """A recipe or command-line value that does not parse or validate, in one line with the fix."""


# ------------------------------------------------------------------------------------------ LightningCLI


class MoECLI(LightningCLI):
    """LightningCLI that checks ``--ckpt_path`` first, writes checkpoints atomically and reports where a run went.

    - ``--ckpt_path`` goes through :func:`lightning_moe.io.checkpoint_file`: a missing, empty, truncated,
      foreign or wrong-kind checkpoint is a one-line :class:`~lightning_moe.io.CheckpointLoadError`, an
      expert-parallel directory is consolidated for strategies that read single files.
    - Config errors become one-line :class:`ConfigError` messages naming the value and the fix.
    - The Trainer's checkpoint plugin is :class:`~lightning_moe.io.AtomicCheckpointIO` unless the recipe
      chose another.
    - After ``fit`` it prints the checkpoints, logs and metrics, and says so loudly when ``max_time``
      stopped the run before ``max_steps``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._resources = contextlib.ExitStack()
        try:
            super().__init__(*args, **kwargs)
        finally:
            self._resources.close()

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            raise ConfigError(_config_error_line(str(e))) from e  # --debug shows the original
        self._check_ckpt_path()

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (argparse.ArgumentError, ValueError, TypeError) as e:
            if isinstance(e, CheckpointLoadError | ConfigError):
                raise
            raise ConfigError(_config_error_line(str(e))) from e

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:  # e.g. enable_progress_bar=False with a bar callback
            raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from e
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            from lightning_moe.io import AtomicCheckpointIO

            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _check_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt = config.get("ckpt_path")
        if not ckpt or str(ckpt) in _SPECIAL_CKPT_PATHS:
            return
        module = _import_class(config.get("model"))
        keep_directories = _strategy_reads_directories(config.get("trainer", {}).get("strategy"))
        path = self._resources.enter_context(checkpoint_file(ckpt, module=module, keep_directories=keep_directories))
        config["ckpt_path"] = path

    def before_fit(self) -> None:
        """Say so when a fresh run is about to replace an earlier run's ``last.ckpt``."""
        if not self.trainer.is_global_zero or self.config_init[self.subcommand].get("ckpt_path"):
            return
        callback = self.trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        last = Path(dirpath) / "last.ckpt" if dirpath else None
        if last is not None and last.exists():
            print(
                f"note: {last} belongs to an earlier run; this new run replaces it. To continue that run instead, "
                f"pass --ckpt_path {last}",
                file=sys.stderr,
            )

    def after_fit(self) -> None:
        """Print where the checkpoints, logs and metrics went (and why the run stopped, if early)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = ["", "Run finished."]
        callback = trainer.checkpoint_callback
        best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
        if best:
            lines.append(f"  checkpoint (best): {best}")
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
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
        stopped = _early_stop_line(trainer)
        if stopped:
            lines.append(stopped)
        print("\n".join(lines))
        if stopped:
            print(stopped.strip(), file=sys.stderr)

    def after_predict(self) -> None:
        """Print the predictions (for translation: one translated sentence per line)."""
        if not self.trainer.is_global_zero:
            return
        for batch in self.trainer.predict_loop.predictions or []:
            for item in batch if isinstance(batch, list) else [batch]:
                print(item)


def _early_stop_line(trainer: Trainer) -> str:
    """A loud line when the run ended before ``max_steps`` because ``max_time`` ran out (else empty)."""
    max_steps = trainer.max_steps
    if max_steps is None or max_steps < 0 or trainer.global_step >= max_steps:
        return ""
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if timer is not None and (timer.time_remaining("train") or 0) <= 0:
        return (
            f"  WARNING: max_time ({timer._duration:.0f} s) stopped training at step {trainer.global_step} of "
            f"max_steps={max_steps}; the results are those of a shorter run. Raise trainer.max_time (or set it to "
            "null), or continue with --ckpt_path on last.ckpt"
        )
    return (
        f"  WARNING: training stopped at step {trainer.global_step} of max_steps={max_steps} (max_epochs, an early-"
        "stopping callback or an interrupt)"
    )


def _import_class(value: Any) -> type | None:
    """The class of a ``class_path`` config entry (``None`` if there is none or it does not import)."""
    class_path = value.get("class_path") if hasattr(value, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) else None


def _strategy_reads_directories(strategy: Any) -> bool:
    """Whether the configured strategy loads checkpoint directories itself (ExpertParallelStrategy)."""
    if isinstance(strategy, str):
        return strategy == "expert_parallel"
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if isinstance(class_path, str):
        return class_path.endswith("ExpertParallelStrategy")
    return type(strategy).__name__ == "ExpertParallelStrategy"


def run_cli(args: Sequence[str]) -> MoECLI:
    """Run one LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    subcommand_kwargs = {"epilog": _FIELDS_HINT}
    with warnings.catch_warnings():
        # LightningCLI warns when args= is given and sys.argv has arguments too: that is how we call it.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        return MoECLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args),
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "lightning-moe",
                "description": "Train and evaluate lightning_moe models from a YAML recipe.",
                "exit_on_error": False,
                **{name: dict(subcommand_kwargs) for name in SUBCOMMANDS},
            },
        )


# ------------------------------------------------------------------------------------------ config errors


def _config_error_line(message: str) -> str:
    """The one line of a jsonargparse error that names the bad value, with a fix or "did you mean"."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = "\n".join(lines)
    key = _config_key(text)
    match = re.search(r"class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", text, re.S)
    if match:
        class_path, option = match.groups()
        cls = _import_class({"class_path": class_path})
        name = class_path.rsplit(".", 1)[-1]
        fields = list(inspect.signature(cls.__init__).parameters)[1:] if cls is not None else []
        return (
            f"{key}.init_args.{option} is not a field of {name}{_did_you_mean(option, fields)}; list its fields with "
            f"lightning-moe fit --{key}.help {name}"
        )
    match = re.search(r'Parser key "(\w+)":\s*Expected a <class \'(\w+)\'>\. Got value: (.*)', text)
    if match:
        field, expected, got = match.groups()
        return f"{key}.init_args.{field}: expected a {expected}, got {got!r}"
    match = re.search(r"unrecognized arguments: (.*)", text)
    if match:
        options = [tok for tok in match.group(1).split() if tok.startswith("-")]
        if options:
            option = options[0].split("=", 1)[0]
            return (
                f"unknown option {option}{_did_you_mean(option, _known_options(option))}; see lightning-moe fit --help"
            )
        return f"unexpected argument(s) {match.group(1)!r}; see lightning-moe --help"
    noise = ("Given value", "Subtypes:", "Does not validate against any", "Errors:", "- Expected a <class 'NoneType'>")
    kept = [line.removeprefix("- ") for line in lines if not line.startswith(noise)]
    kept = [line for line in kept if not re.fullmatch(r'Parser key "\w+":', line)]
    detail = "; ".join(kept) or lines[-1] if lines else message
    return f"{key}: {detail}"[:400] if key != "config" else detail[:400]


def _config_key(text: str) -> str:
    """``model``, ``data`` or ``trainer``: the part of the config an error is about."""
    first = re.match(r'Parser key "(\w+)"', text)
    if first and first.group(1) in ("model", "data", "trainer"):
        return first.group(1)
    if "LightningDataModule" in text:
        return "data"
    if "LightningModule" in text:
        return "model"
    return "config"


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_options(option: str) -> list[str]:
    """Option names an unrecognised ``--trainer.x`` / ``--x`` may have meant."""
    if option.startswith("--trainer."):
        return [f"--trainer.{p}" for p in list(inspect.signature(Trainer.__init__).parameters)[1:]]
    return ["--model", "--data", "--trainer", "--ckpt_path", "--seed_everything", "--optimizer", "--lr_scheduler",
            "--print_config", "--config"]  # fmt: skip


# ------------------------------------------------------------------------------------------ translate


def _translate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe translate",
        description="Translate text with a trained MultitaskTranslationModule checkpoint. One output line per input "
        "line; an empty input line gives an empty output line.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint: a .ckpt file, or an expert-parallel checkpoint directory"
    )
    parser.add_argument("--tgt-lang", required=True, help="target language code, e.g. de")
    parser.add_argument("--beam-size", type=int, default=4, help="beam width (1 = greedy); default 4")
    parser.add_argument("--max-length", type=int, default=None, help="maximum output tokens")
    parser.add_argument("text", nargs="*", help="sentences to translate; read from stdin (one per line) if none")
    return parser


def _has_tokenizer(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """``translate`` needs the tokenizer that MultitaskTranslationModule saves in its checkpoints."""
    saved = checkpoint.get("lightning_moe")
    if not isinstance(saved, Mapping) or not saved.get("tokenizer"):
        keys = sorted(saved) if isinstance(saved, Mapping) else []
        raise CheckpointLoadError(
            f"{path} carries no tokenizer (its 'lightning_moe' entry holds {keys}), so it cannot translate text; "
            "pass a checkpoint written by MultitaskTranslationModule (lightning-moe fit -c recipes/m3_tiny.yaml)"
        )


def translate_main(argv: Sequence[str]) -> int:
    """``lightning-moe translate``: load a checkpoint and translate sentences.

    Returns:
        The process exit code: 0, or 2 with a one-line error on a bad checkpoint or language.

    Raises:
        CheckpointLoadError: if the checkpoint is missing or unusable (``main`` prints it, exit code 2).
    """
    args = _translate_parser().parse_args(list(argv))
    from lightning_moe.modules.translation import MultitaskTranslationModule

    with checkpoint_file(args.ckpt, module=MultitaskTranslationModule, require=_has_tokenizer) as path:
        module = MultitaskTranslationModule.from_checkpoint(path)
    languages = list(module.tokenizer.languages)
    if args.tgt_lang not in languages:
        print(
            f"error: --tgt-lang {args.tgt_lang!r} is not a language of this model; choose one of {sorted(languages)}",
            file=sys.stderr,
        )
        return 2
    texts = list(args.text) if args.text else [line.rstrip("\r\n") for line in sys.stdin]
    kwargs = {"beam_size": args.beam_size}
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    for line in module.translate(texts, args.tgt_lang, **kwargs):
        print(line)
    return 0


# ------------------------------------------------------------------------------------------ consolidate


def _consolidate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe consolidate",
        description="Merge an expert-parallel checkpoint directory into one .ckpt file (for translate, validate, "
        "single-device training). The file is written atomically.",
    )
    parser.add_argument("src", help="checkpoint directory written by ExpertParallelStrategy (or a .ckpt file)")
    parser.add_argument("dst", help="output .ckpt file")
    parser.add_argument(
        "--weights-only", action="store_true", help="drop optimizer, scheduler, loop and callback state"
    )
    return parser


def consolidate_main(argv: Sequence[str]) -> int:
    """``lightning-moe consolidate SRC DST [--weights-only]``.

    Returns:
        The exit code: 0.

    Raises:
        CheckpointLoadError: if ``src`` is not a usable checkpoint (``main`` prints it, exit code 2).
    """
    from lightning_moe.io import atomic_save
    from lightning_moe.surgery.checkpoints import layer_num_experts, moe_layer_names

    args = _consolidate_parser().parse_args(list(argv))
    checkpoint = load_checkpoint(args.src, check_finite=False, weights_only_model=args.weights_only)
    if args.weights_only:
        checkpoint = {k: v for k, v in checkpoint.items() if k not in _TRAINING_STATE_KEYS}
    atomic_save(checkpoint, args.dst)
    state_dict = checkpoint["state_dict"]
    experts = [layer_num_experts(state_dict, name) for name in moe_layer_names(state_dict)]
    print(f"wrote {args.dst}: {len(experts)} MoE layers, experts {experts}")
    return 0


# ------------------------------------------------------------------------------------------ main


def _help_text() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, line in COMMANDS.items())
    return (
        "usage: lightning-moe COMMAND [options]      (the same as: python -m lightning_moe COMMAND ...)\n\n"
        "Mixture-of-Experts training for PyTorch Lightning.\n\n"
        f"commands:\n{rows}\n\n"
        "Each command's options: lightning-moe COMMAND --help.\n"
        f"{_FIELDS_HINT}.\n"
        f"A bad checkpoint or config value is one line with exit code 2; --debug (or {DEBUG_ENV}=1) shows the "
        "traceback."
    )


def _run(args: list[str]) -> int | None:
    command = args[0]
    if command == "translate":
        return translate_main(args[1:])
    if command == "consolidate":
        return consolidate_main(args[1:])
    if command in SURGERY_COMMANDS:
        from lightning_moe.surgery import commands

        return int(getattr(commands, SURGERY_COMMANDS[command])(args[1:]))
    if command == "convert":
        from lightning_moe.hf.convert_command import main as convert_main

        return int(convert_main(args[1:]))
    if command == "upcycle":
        from lightning_moe.surgery.upcycle_command import main as upcycle_main

        return int(upcycle_main(args[1:]))
    if command == "estimate-memory":
        from lightning_moe.strategy.memory_command import main as estimate_memory_main

        return int(estimate_memory_main(args[1:]))
    if command in SUBCOMMANDS or command.startswith("-"):
        run_cli(args)
        return None
    known = list(COMMANDS)
    print(
        f"error: unknown command {command!r}{_did_you_mean(command, known)}; see lightning-moe --help", file=sys.stderr
    )
    return 2


@contextlib.contextmanager
def _one_line_errors(debug: bool) -> Iterator[None]:
    """Turn the errors a user can fix into ``error: ...`` on stderr and an exit code (tracebacks with ``debug``)."""
    from lightning_moe.callbacks.non_finite import NonFiniteError

    try:
        yield
    except (CheckpointLoadError, ConfigError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-moe`` console script.

    ``fit``/``validate``/``test``/``predict`` return normally when they succeed; the other commands, and
    every error, end with ``SystemExit`` and the exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help_text())
        raise SystemExit(0 if args else 2)
    with _one_line_errors(debug):
        code = _run(args)
    if code is not None:
        raise SystemExit(code)
