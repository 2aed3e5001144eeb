"""Run a LightningCLI recipe without LightningCLI: ``python -m lightning_moe.train_yaml -c RECIPE.yaml``.

LightningCLI needs ``jsonargparse``, which some images (a GPU image with only torch and lightning)
do not have. This entry point reads the same YAML recipe with PyYAML (a dependency of Lightning)
and builds everything itself: ``seed_everything``; ``trainer`` (its keyword arguments, with
``class_path``/``init_args`` entries such as loggers, callbacks and strategies instantiated);
``model`` and ``data`` (``class_path``/``init_args``). An ``init_args`` value that is a mapping
without ``class_path`` becomes a dataclass when the constructor's type hint asks for one (a model
``config``). Then it calls ``Trainer.fit`` (or ``validate``/``test``).

::

    python -m lightning_moe.train_yaml -c recipes/m3_paper.yaml
    python -m lightning_moe.train_yaml fit -c recipes/m3_paper.yaml --set trainer.max_steps=100 \
        --set data.init_args.data_dir=/data/libreoffice
    python -m lightning_moe.train_yaml validate -c recipes/m3_paper.yaml --ckpt_path last.ckpt

``--set KEY=VALUE`` overrides one field (dotted path; the value is read as YAML, so ``null``,
numbers and lists work). It covers what the recipes use; it is not a full jsonargparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = ["apply_override", "instantiate", "load_recipe", "main", "run_recipe"]

SUBCOMMANDS = ("fit", "validate", "test")


def _import(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {path!r} is not a dotted path; write it as package.module.ClassName")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"cannot import class_path {path!r} ({e}); check the spelling and the installed packages"
        ) from e


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (directly or inside ``X | None``), or None."""
    if inspect.isclass(annotation) and dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _dataclass_in(arg)
            if found is not None:
                return found
    return None


def _hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: instantiate without dataclass conversion
        return {}


def instantiate(spec: Any, annotation: Any = None) -> Any:
    """Build objects from a recipe value.

    A mapping with ``class_path`` is instantiated with its (recursively instantiated) ``init_args``;
    a mapping where ``annotation`` names a dataclass becomes that dataclass; lists and other mappings
    are instantiated element by element; anything else is returned as is.

    Args:
        spec: the recipe value.
        annotation: the type hint of the argument it is for, if known.

    Returns:
        The built value.

    Raises:
        ValueError: if a ``class_path`` cannot be imported or its ``init_args`` is not a mapping.
    """
    if isinstance(spec, Mapping) and "class_path" in spec:
        cls = _import(str(spec["class_path"]))
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"init_args of {spec['class_path']} must be a mapping, got {init_args!r}")
        hints = _hints(cls)
        return cls(**{k: instantiate(v, hints.get(k)) for k, v in init_args.items()})
    if isinstance(spec, Mapping):
        target = _dataclass_in(annotation)
        if target is not None:
            hints = _hints(target)
            return target(**{k: instantiate(v, hints.get(k)) for k, v in spec.items()})
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and "class_path" not in value:
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_recipe(paths: Sequence[str]) -> dict[str, Any]:
    """Read and deep-merge YAML recipes (later files override earlier ones)."""
    recipe: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} does not hold a YAML mapping (trainer:, model:, data:, ...)")
        recipe = _merge(recipe, loaded)
    return recipe


def apply_override(recipe: dict[str, Any], assignment: str) -> None:
    """Set ``KEY=VALUE`` in ``recipe`` (dotted ``KEY``, ``VALUE`` read as YAML), in place.

    Raises:
        ValueError: if the assignment has no ``=``.
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r} must look like KEY=VALUE, e.g. trainer.max_steps=100")
    node = recipe
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def run_recipe(recipe: Mapping[str, Any], subcommand: str = "fit", ckpt_path: str | None = None) -> Any:
    """Build the trainer, model and datamodule of ``recipe`` and run ``subcommand``.

    Returns:
        The trainer, after the run.

    Raises:
        ValueError: if the subcommand is unknown or the recipe lacks ``model``.
        CheckpointLoadError: if ``ckpt_path`` is not a usable checkpoint of the recipe's model (checked
            by :func:`lightning_moe.io.checkpoint_file` before the run).
    """
    import lightning as L

    if subcommand not in SUBCOMMANDS:
        raise ValueError(f"subcommand {subcommand!r} is not supported here; choose one of {SUBCOMMANDS}")
    if "model" not in recipe:
        raise ValueError("the recipe has no model: section (class_path and init_args of a LightningModule)")
    seed = recipe.get("seed_everything")
    if seed is not None and seed is not False:
        L.seed_everything(None if seed is True else int(seed), workers=True)
    from lightning.pytorch.plugins import TorchCheckpointIO

    from lightning_moe.io import AtomicCheckpointIO, checkpoint_file

    trainer_hints = _hints(L.Trainer)
    trainer = L.Trainer(**{k: instantiate(v, trainer_hints.get(k)) for k, v in (recipe.get("trainer") or {}).items()})
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # as the lightning-moe command: atomic writes
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    model = instantiate(recipe["model"])
    data = instantiate(recipe["data"]) if recipe.get("data") else None
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
        getattr(trainer, subcommand)(model, datamodule=data, ckpt_path=ckpt_path)
        return trainer
    keep_directories = type(trainer.strategy).__name__ == "ExpertParallelStrategy"
    with checkpoint_file(ckpt_path, module=type(model), keep_directories=keep_directories) as path:
        getattr(trainer, subcommand)(model, datamodule=data, ckpt_path=path)
    return trainer


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_moe.train_yaml [fit|validate|test] -c RECIPE [--set KEY=VALUE ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_moe.train_yaml",
        description="Run a LightningCLI YAML recipe without jsonargparse.",
    )
    parser.add_argument("subcommand", nargs="?", default="fit", choices=SUBCOMMANDS)
    parser.add_argument("-c", "--config", action="append", required=True, help="recipe YAML (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--ckpt_path", default=None, help="checkpoint to resume from or to evaluate")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    for assignment in args.set:
        apply_override(recipe, assignment)
    from lightning_moe.callbacks.non_finite import NonFiniteError
    from lightning_moe.io import CheckpointLoadError

    try:
        trainer = run_recipe(recipe, args.subcommand, args.ckpt_path)
    except CheckpointLoadError as e:  # one line, as the lightning-moe command prints it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if trainer.is_global_zero:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") or ""
        if best:
            print(f"checkpoint (best): {best}")
        for key in sorted(trainer.callback_metrics):
            if key.startswith(("val/", "test/")) and "_" not in key.split("/", 1)[1]:
                print(f"{key} = {float(trainer.callback_metrics[key]):.4f}")


if __name__ == "__main__":
    main()
