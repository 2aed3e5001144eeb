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

    Raises:
        ValueError: if the tokenizer class cannot be imported.
    """
    module_name, _, class_name = saved["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"cannot import the checkpoint's tokenizer class {saved['class_path']!r} ({e}); install the package "
            "that defines it"
        ) from e
    return cls.from_dict(saved["state"])


__all__ = ["tokenizer_from_state", "tokenizer_to_state"]
