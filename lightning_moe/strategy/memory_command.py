"""``lightning-moe estimate-memory``: the memory a recipe needs per GPU under ExpertParallelStrategy.

Reads the model config, the batch and the Trainer's devices, precision and strategy from a recipe
YAML (``recipes/*.yaml``), lets flags override them, and prints :func:`estimate_memory`'s table::

    lightning-moe estimate-memory -c recipes/gpt_moe_tiny.yaml --devices 8 --expert_parallel_size 4
    lightning-moe estimate-memory -c RECIPE.yaml --devices 1 --cpu_offload --activation_checkpointing full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_moe.models.config import GPTConfig, TransformerConfig
from lightning_moe.strategy.memory import DATA_PARALLEL_MODES, MemoryEstimate, estimate_memory

# The LightningModules of recipes and the config dataclass each takes.
MODULE_CONFIGS: dict[str, type[GPTConfig] | type[TransformerConfig]] = {
    "LanguageModelModule": GPTConfig,
    "MultitaskTranslationModule": TransformerConfig,
}
_PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}


class RecipeError(ValueError):
    """A recipe that does not say what the estimate needs, with what to change."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe estimate-memory",
        description="Estimate per-GPU (and host) memory of training a recipe with ExpertParallelStrategy.",
    )
    parser.add_argument("-c", "--config", required=True, help="recipe YAML (model, data and trainer sections)")
    parser.add_argument("--devices", type=int, default=None, help="GPUs per node (default: the recipe's)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes (default: the recipe's, or 1)")
    parser.add_argument(
        "--expert_parallel_size", type=int, default=None,
        help="P (default: the recipe strategy's, else the strategy's choice: the largest P dividing the GPUs "
        "of a node and num_experts)",
    )  # fmt: skip
    parser.add_argument("--data_parallel", choices=DATA_PARALLEL_MODES, default=None, help="default: fsdp")
    parser.add_argument("--cpu_offload", action="store_true", default=None, help="offload states to host memory")
    parser.add_argument("--activation_checkpointing", choices=("full", "experts"), default=None)
    parser.add_argument("--precision", default=None, help="32-true | bf16-mixed | bf16-true (default: the recipe's)")
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per GPU (default: data.batch_size)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the data's)")
    parser.add_argument(
        "--moe_backend", choices=("torch", "triton"), default=None,
        help="expert kernels (default: the model's; 'auto' is triton on GPU recipes, torch on CPU ones)",
    )  # fmt: skip
    parser.add_argument("--unit", choices=("auto", "GiB", "MiB", "B"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    return parser


def _init_args(section: Any) -> dict[str, Any]:
    if isinstance(section, dict):
        return dict(section.get("init_args") or {})
    return {}


def model_config_from_recipe(recipe: dict[str, Any]) -> GPTConfig | TransformerConfig:
    """The model config a recipe trains (``vocab_size`` from the model or, if unset, the data section).

    Reads ``model.init_args.config`` (modules configured by their dataclass) or, for older recipes,
    the config fields directly under ``model.init_args``.

    Args:
        recipe: the parsed YAML.

    Returns:
        The validated config.

    Raises:
        RecipeError: for a model class without a known config, or no vocabulary size.
    """
    model = recipe.get("model")
    class_path = model.get("class_path", "") if isinstance(model, dict) else ""
    name = class_path.rpartition(".")[2]
    if name not in MODULE_CONFIGS:
        raise RecipeError(
            f"model.class_path {class_path!r} is not one of {sorted(MODULE_CONFIGS)}; estimate-memory reads the model "
            "config of those modules"
        )
    cls = MODULE_CONFIGS[name]
    init = _init_args(model)
    nested = init.get("config")
    if isinstance(nested, dict):
        values = _init_args(nested) if "init_args" in nested else dict(nested)
    else:
        values = dict(init)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k in names}
    if values.get("vocab_size") is None:
        values["vocab_size"] = init.get("vocab_size") or _init_args(recipe.get("data")).get("vocab_size")
    if values.get("vocab_size") is None:
        raise RecipeError("the recipe sets no vocab_size (model config or data.init_args.vocab_size); add one")
    return cls(**values)


def _strategy_args(trainer: dict[str, Any]) -> dict[str, Any]:
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("ExpertParallelStrategy"):
        return _init_args(strategy)
    return {}


def _precision(value: Any) -> str:
    text = str(value if value is not None else "32-true")
    return _PRECISION_ALIASES.get(text, text)


def estimate_from_recipe(recipe: dict[str, Any], args: argparse.Namespace) -> MemoryEstimate:
    """:func:`estimate_memory` for a parsed recipe and the command's flags (flags win).

    Raises:
        RecipeError: if the recipe lacks what the estimate needs.
        ValueError: from :func:`estimate_memory` on a layout that does not fit.
    """
    config = model_config_from_recipe(recipe)
    trainer = recipe.get("trainer") or {}
    data = _init_args(recipe.get("data"))
    strategy = _strategy_args(trainer)
    devices = args.devices if args.devices is not None else trainer.get("devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1:
        raise RecipeError(f"trainer.devices={devices!r} is not a number of devices; pass --devices N")
    num_nodes = args.num_nodes if args.num_nodes is not None else int(trainer.get("num_nodes", 1) or 1)
    world = devices * num_nodes
    P = args.expert_parallel_size or strategy.get("expert_parallel_size")
    if P is None:  # the strategy's default: experts split over the GPUs of a node
        P = math.gcd(devices, config.num_experts) if config.num_experts else 1
    batch_size = args.batch_size if args.batch_size is not None else data.get("batch_size")
    seq_len = args.seq_len if args.seq_len is not None else data.get("seq_len", data.get("max_length"))
    if batch_size is None or seq_len is None:
        raise RecipeError(
            "the recipe's data section sets no batch_size and seq_len (or max_length); pass --batch_size and --seq_len"
        )
    backend = args.moe_backend
    if backend is None and config.moe_backend == "auto":
        backend = "torch" if str(trainer.get("accelerator", "auto")) == "cpu" else "triton"
    offload = args.cpu_offload if args.cpu_offload is not None else bool(strategy.get("cpu_offload", False))
    return estimate_memory(
        config,
        batch_size=int(batch_size),
        seq_len=int(seq_len),
        world_size=world,
        expert_parallel_size=int(P),
        data_parallel=args.data_parallel or strategy.get("data_parallel", "fsdp"),
        cpu_offload=offload,
        activation_checkpointing=args.activation_checkpointing or strategy.get("activation_checkpointing"),
        precision=_precision(args.precision or trainer.get("precision")),
        moe_backend=backend,
    )


def main(argv: Sequence[str]) -> int:
    """Run ``lightning-moe estimate-memory``; returns the exit code (2 on a bad recipe or layout)."""
    args = _parser().parse_args(list(argv))
    path = Path(args.config)
    if not path.is_file():
        print(f"error: recipe {str(path)!r} does not exist; pass -c with a recipe YAML", file=sys.stderr)
        return 2
    recipe = yaml.safe_load(path.read_text()) or {}
    try:
        estimate = estimate_from_recipe(recipe, args)
    except (RecipeError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(estimate), indent=2))
    else:
        print(estimate.table(args.unit))
    return 0


__all__ = ["MODULE_CONFIGS", "RecipeError", "estimate_from_recipe", "main", "model_config_from_recipe"]
