"""One checkpoint loader for every command: safe to point at any file, and clear when the file is wrong.

:func:`load_checkpoint` reads a Lightning checkpoint file or an expert-parallel checkpoint
directory and returns one checkpoint dict. It never unpickles arbitrary objects: files are read with
``torch.load(weights_only=True)`` and an allowlist of the project's own types (dataclasses and enums
defined in ``lightning_moe``, plus ``pathlib`` paths), so a checkpoint from an untrusted source
cannot run code. Directories are checked the same way *before* anything reads them (every
``torch.save`` file inside by a static scan of its pickle, ``torch.distributed.checkpoint``'s
``.metadata`` by a restricted unpickler) and then merged with
:func:`lightning_moe.strategy.checkpoint.consolidate_checkpoint`.

Whatever is wrong (a missing, empty, truncated or random file, a directory that is no checkpoint,
foreign Python objects, a checkpoint of another module, non-finite weights), the error is one
:class:`CheckpointLoadError` line that names the path, what is wrong and what to pass instead; the
commands print it and exit with code 2.

Example::

    checkpoint = load_checkpoint("runs/m3_tiny/checkpoints/last.ckpt", module=MultitaskTranslationModule)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import inspect
import math
import os
import pathlib
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointLoadError",
    "checkpoint_file",
    "checkpoint_module_name",
    "load_checkpoint",
    "read_checkpoint_file",
    "record_module",
    "safe_globals_for",
    "scan_checkpoint_directory",
    "torch_load_safe",
]

#: Where a ``lightning_moe`` module records its class in the checkpoints it writes.
MODULE_KEY = ("lightning_moe", "module")
#: Globals outside ``torch``'s weights-only defaults that checkpoints of this project may name.
_FIXED_SAFE = {
    "pathlib.PosixPath": pathlib.PosixPath,
    "pathlib.WindowsPath": pathlib.WindowsPath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "pathlib.Path": pathlib.Path,
}
_ZIP_MAGIC = b"PK\x03\x04"
_DCP_METADATA = ".metadata"


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be used: the one-line message names the path, the problem and what to pass instead."""


# ------------------------------------------------------------------------------------------- allowlist


def _resolve_global(name: str) -> Any:
    """The object a pickle global ``module.qualname`` names, importing at most a ``lightning_moe`` module."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if module_name != "lightning_moe" and not module_name.startswith("lightning_moe."):
            return None
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _is_project_type(obj: Any) -> bool:
    """A dataclass or enum class of ``lightning_moe``: rebuilt from data alone, no code of the file's choosing."""
    if not isinstance(obj, type) or not obj.__module__.startswith("lightning_moe"):
        return False
    return dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)


def safe_globals_for(path: str | os.PathLike) -> list[Any]:
    """The allowlisted globals a ``torch.save`` file needs, from a static scan of its pickle (nothing runs).

    Args:
        path: a file written by ``torch.save``.

    Returns:
        The objects to pass to ``torch.serialization.safe_globals``.

    Raises:
        CheckpointLoadError: if the file names a global that is not allowlisted.
    """
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed, unsafe = [], []
    for name in names:
        obj = _FIXED_SAFE.get(name)
        if obj is None:
            candidate = _resolve_global(name)
            obj = candidate if _is_project_type(candidate) else None
        (allowed if obj is not None else unsafe).append(obj if obj is not None else name)
    if unsafe:
        raise CheckpointLoadError(
            f"{path} contains Python objects that are not tensors, plain values or lightning_moe types "
            f"({', '.join(sorted(unsafe)[:3])}); loading it could run code, so it is refused: pass a checkpoint "
            "written by lightning-moe (or re-save this one from a trusted Python session)"
        )
    return allowed


def torch_load_safe(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with this project's allowlist; raw torch errors pass through.

    Raises:
        CheckpointLoadError: if the file names a global outside the allowlist.
    """
    with torch.serialization.safe_globals(safe_globals_for(path)):
        return torch.load(path, map_location=map_location, weights_only=True)


def _torch_weights_only_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``torch.distributed.checkpoint``'s ``.metadata``: its own classes, dtypes and paths only."""

    def find_class(self, module: str, name: str) -> Any:
        obj: Any = None
        torch_safe = _torch_weights_only_globals()
        if f"{module}.{name}" in torch_safe:  # what torch.load(weights_only=True) itself allows
            obj = torch_safe[f"{module}.{name}"]
        elif module.startswith("torch.distributed.checkpoint."):
            obj = getattr(importlib.import_module(module), name, None)
        elif module == "torch":
            candidate = getattr(torch, name, None)
            if name == "Size" or isinstance(candidate, torch.dtype | torch.layout | torch.memory_format):
                obj = candidate
        elif module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            obj = OrderedDict
        elif f"{module}.{name}" in _FIXED_SAFE:
            obj = _FIXED_SAFE[f"{module}.{name}"]
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def scan_checkpoint_directory(path: str | os.PathLike) -> None:
    """Check every pickle of a checkpoint directory for foreign objects, without running any of them.

    ``torch.save`` files (``common.pt``, ``meta.pt``, ``experts-*.pt``) are scanned statically;
    ``.metadata`` of ``torch.distributed.checkpoint`` is read by a restricted unpickler (its
    ``*.distcp`` shards hold tensors and ``torch.save`` items that DCP loads weights-only itself).

    Raises:
        CheckpointLoadError: naming the first file that holds a non-allowlisted object, or one that is
            empty or cut off.
    """
    for file in sorted(Path(path).rglob("*")):
        if not file.is_file():
            continue
        if file.name == _DCP_METADATA:
            try:
                with open(file, "rb") as f:
                    _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise CheckpointLoadError(
                    f"{file} names the Python object {e}, which a distributed checkpoint never holds; loading it "
                    "could run code, so it is refused: pass a checkpoint directory written by lightning-moe"
                ) from None
            except (EOFError, ValueError, TypeError, AttributeError) as e:
                raise CheckpointLoadError(
                    f"{file} is empty or cut off ({type(e).__name__}); the checkpoint directory {path} is incomplete: "
                    "pass an earlier checkpoint, or copy the whole directory again"
                ) from None
        elif file.suffix != ".distcp" and _starts_with_zip(file):  # DCP reads its shards weights-only itself
            try:
                safe_globals_for(file)
            except CheckpointLoadError:
                raise
            except Exception as e:  # a truncated zip: the loader names it when it reads the file
                raise CheckpointLoadError(
                    f"{file} is truncated or corrupt ({_short(e)}); the checkpoint directory {path} is incomplete: "
                    "pass an earlier checkpoint, or copy the whole directory again"
                ) from None


# ------------------------------------------------------------------------------------------- loading


def _starts_with_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(". This is an internal miniz error")[0]
    return text[:120]


def read_checkpoint_file(path: Path, map_location: Any = "cpu") -> Any:
    """One checkpoint file read safely, or a :class:`CheckpointLoadError` that says what is wrong with it."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointLoadError(
            f"checkpoint {path} is empty (0 bytes): its write was cut off; pass an earlier checkpoint of the run"
        )
    if not _starts_with_zip(path):
        raise CheckpointLoadError(
            f"{path} is not a PyTorch checkpoint (it does not start like a file of torch.save); pass a .ckpt "
            "written by lightning-moe fit"
        )
    try:
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointLoadError(
            f"checkpoint {path} is truncated or corrupt ({size} bytes, no complete zip directory): its write was "
            "cut off or the copy is incomplete; pass an earlier checkpoint, or copy it again"
        ) from None
    try:
        return torch_load_safe(path, map_location)
    except CheckpointLoadError:
        raise
    except Exception as e:
        raise CheckpointLoadError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {_short(e)}); it is corrupt: pass an earlier "
            "checkpoint of the run"
        ) from None


def _is_checkpoint_directory(path: Path) -> bool:
    from lightning_moe.strategy.checkpoint import is_sharded_checkpoint

    return bool(is_sharded_checkpoint(path))


def _require_checkpoint_directory(path: Path) -> None:
    if not _is_checkpoint_directory(path):
        raise CheckpointLoadError(
            f"{path} is a directory but not a checkpoint (no common.pt, .metadata or meta.pt); pass a .ckpt file or "
            "a checkpoint directory written by ExpertParallelStrategy"
        )
    scan_checkpoint_directory(path)


def _consolidate(path: Path, dest: Path, weights_only_model: bool) -> None:
    """Merge a checkpoint directory into the file ``dest`` (after its scan)."""
    _require_checkpoint_directory(path)
    from lightning_moe.strategy.checkpoint import consolidate_checkpoint

    try:
        consolidate_checkpoint(path, dest, weights_only_model=weights_only_model)
    except CheckpointLoadError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError, EOFError) as e:
        raise CheckpointLoadError(
            f"checkpoint directory {path} cannot be read ({type(e).__name__}: {_short(e)}); pass an earlier "
            "checkpoint, or copy the whole directory again"
        ) from None


def record_module(checkpoint: dict[str, Any], module: Any) -> None:
    """Record in ``checkpoint`` which LightningModule class wrote it (called from ``on_save_checkpoint``).

    Stored as ``checkpoint["lightning_moe"]["module"]``: the class names of the module's class and of its
    LightningModule bases, most derived first, so that a subclass's checkpoint loads where its base class's
    is expected.
    """
    from lightning.pytorch import LightningModule

    names = [
        cls.__name__ for cls in type(module).__mro__ if issubclass(cls, LightningModule) and cls is not LightningModule
    ]
    checkpoint.setdefault(MODULE_KEY[0], {})[MODULE_KEY[1]] = names


def _recorded_modules(checkpoint: Mapping[str, Any]) -> list[str]:
    record = checkpoint.get(MODULE_KEY[0])
    names = record.get(MODULE_KEY[1]) if isinstance(record, Mapping) else None
    return [str(n) for n in names] if isinstance(names, list | tuple) else []


def checkpoint_module_name(checkpoint: Mapping[str, Any]) -> str | None:
    """The class name of the LightningModule that wrote ``checkpoint``, where it can be told.

    Checkpoints of this project's modules record it (:func:`record_module`); for older ones it is
    inferred from the hyper-parameters, which only one of the modules accepts.
    """
    recorded = _recorded_modules(checkpoint)
    if recorded:
        return recorded[0]
    from lightning_moe.modules import CausalLMModule, LanguageModelModule, MultitaskTranslationModule

    for cls in (MultitaskTranslationModule, LanguageModelModule, CausalLMModule):
        if _hparams_fit(cls, checkpoint):
            return cls.__name__
    return None


def _hparams_fit(cls: type, checkpoint: Mapping[str, Any]) -> bool:
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not hparams:
        return False
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return set(hparams) - {"_instantiator", "_class_path"} <= set(params)


def _check_kind(path: Path, checkpoint: Any, module: type | None) -> None:
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointLoadError(
            f"{path} holds no model weights (no 'state_dict'), so it is not a Lightning checkpoint; pass a .ckpt "
            "written by lightning-moe fit"
        )
    if module is None:
        return
    recorded = _recorded_modules(checkpoint)
    if module.__name__ in recorded or (not recorded and _hparams_fit(module, checkpoint)):
        return
    written_by = checkpoint_module_name(checkpoint)
    raise CheckpointLoadError(
        f"{path} is a checkpoint of {written_by or 'another model'}, not of {module.__name__}; pass a checkpoint "
        f"written by a {module.__name__} recipe" + _RECIPE_HINT.get(module.__name__, "")
    )


_RECIPE_HINT = {
    "MultitaskTranslationModule": " (e.g. lightning-moe fit -c recipes/m3_tiny.yaml)",
    "LanguageModelModule": " (e.g. lightning-moe fit -c recipes/gpt_moe_tiny.yaml)",
    "CausalLMModule": " (e.g. lightning-moe fit -c recipes/hf_finetune.yaml)",
}


def _check_finite(path: Path, checkpoint: Mapping[str, Any]) -> None:
    for key, value in checkpoint["state_dict"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointLoadError(
                f"checkpoint {path} has {kind} weights ({key}): the run diverged before it was saved; pass an "
                "earlier checkpoint, or retrain with a lower learning rate"
            )
    callbacks = checkpoint.get("callbacks")
    for name, value in callbacks.items() if isinstance(callbacks, Mapping) else ():
        score = value.get("best_model_score") if isinstance(value, Mapping) else None
        if isinstance(score, torch.Tensor) and score.numel() == 1 and not math.isfinite(float(score)):
            raise CheckpointLoadError(
                f"checkpoint {path} records a non-finite best score ({float(score)}) in {name}: the run diverged; "
                "pass an earlier checkpoint"
            )


def _temporary_directory_near(path: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside ``path`` (same filesystem, room for a large file), else in ``$TMPDIR``."""
    try:
        return tempfile.TemporaryDirectory(prefix=".consolidate-", dir=path.parent)
    except OSError:  # a read-only folder
        return tempfile.TemporaryDirectory(prefix="lightning-moe-consolidate-")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    module: type | None = None,
    map_location: Any = "cpu",
    check_finite: bool = True,
    weights_only_model: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint file or directory as one checkpoint dict, safely, or fail with one clear line.

    Args:
        path: a ``.ckpt`` file, or a checkpoint directory of
            :class:`~lightning_moe.ExpertParallelStrategy` (consolidated on the fly).
        module: the LightningModule class the checkpoint must belong to (``None``: any).
        map_location: where tensors are loaded.
        check_finite: refuse a checkpoint whose weights hold NaN or infinity.
        weights_only_model: for a directory, drop the training state while consolidating.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointLoadError: if the checkpoint is missing, empty, truncated, not a checkpoint, holds
            objects outside the allowlist, belongs to another module or has non-finite weights.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointLoadError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file or a checkpoint directory"
        )
    if p.is_dir():
        with _temporary_directory_near(p) as tmp:
            merged = Path(tmp) / f"{p.name}.ckpt"
            _consolidate(p, merged, weights_only_model)
            checkpoint = read_checkpoint_file(merged, map_location)
    else:
        checkpoint = read_checkpoint_file(p, map_location)
    _check_kind(p, checkpoint, module)
    if check_finite:
        _check_finite(p, checkpoint)
    return checkpoint


@contextlib.contextmanager
def checkpoint_file(
    path: str | os.PathLike,
    *,
    module: type | None = None,
    keep_directories: bool = False,
    require: Callable[[Path, Mapping[str, Any]], None] | None = None,
) -> Iterator[str]:
    """Check a checkpoint like :func:`load_checkpoint` and yield a path Lightning can read.

    A file is checked and yielded as is; a directory is yielded as is with ``keep_directories``
    (a strategy that reads directories itself), else consolidated into a temporary file beside it
    that lives as long as the context.

    Args:
        path: the checkpoint file or directory.
        module: the LightningModule class the checkpoint must belong to.
        keep_directories: hand directories through (after their scan) instead of consolidating them.
        require: a further check of the loaded checkpoint (``require(path, checkpoint)``) that raises
            :class:`CheckpointLoadError`; not applied to directories handed through.

    Yields:
        The path to pass as ``ckpt_path``.

    Raises:
        CheckpointLoadError: as :func:`load_checkpoint`.
    """
    p = Path(path)
    if not p.is_dir():
        checkpoint = load_checkpoint(p, module=module)
        if require is not None:
            require(p, checkpoint)
        del checkpoint
        yield str(p)
        return
    if keep_directories:
        _require_checkpoint_directory(p)
        yield str(p)
        return
    with _temporary_directory_near(p) as tmp:
        merged = Path(tmp) / f"{p.name}.ckpt"
        _consolidate(p, merged, weights_only_model=False)
        checkpoint = read_checkpoint_file(merged, "cpu")
        _check_kind(p, checkpoint, module)
        _check_finite(p, checkpoint)
        if require is not None:
            require(p, checkpoint)
        del checkpoint
        yield str(merged)
