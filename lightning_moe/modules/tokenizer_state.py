"""Tokenizers inside checkpoints: class path plus ``to_dict()`` state, rebuilt with ``from_dict``."""

from __future__ import annotations

import importlib
from typing import Any


def tokenizer_to_state(tokenizer: Any) -> dict[str, Any]:
    """``{"class_path": "pkg.module.Class", "state": tokenizer.to_dict()}``, JSON-able."""
    cls = type(tokenizer)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "state": tokenizer.to_dict()}


def tokenizer_from_state(saved: dict[str, Any]) -> Any:
    """Rebuild the tokenizer saved by :func:`tokenizer_to_state`.

    Only tokenizer classes of ``lightning_moe`` are rebuilt: a checkpoint names the class, and a
    checkpoint from an untrusted source must not choose which code runs.

    Raises:
        ValueError: if the tokenizer class is not one of ``lightning_moe`` or cannot be imported.
    """
    class_path = str(saved["class_path"])
    if not class_path.startswith("lightning_moe."):
        raise ValueError(
            f"the checkpoint's tokenizer class {class_path!r} is not a lightning_moe tokenizer; only lightning_moe "
            "tokenizers are rebuilt from checkpoints (pass a checkpoint written by lightning-moe)"
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"cannot import the checkpoint's tokenizer class {saved['class_path']!r} ({e}); install the package "
            "that defines it"
        ) from e
    return cls.from_dict(saved["state"])


__all__ = ["tokenizer_from_state", "tokenizer_to_state"]
