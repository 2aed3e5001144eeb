"""Files of a Hugging Face model directory: ``config.json``, safetensors shards and their index, ``tokenizer.json``.

Nothing here downloads: every function takes a local directory. Tensors are read lazily through
``safetensors.safe_open``; :meth:`SafetensorsDirectory.read` takes an optional range of the first
dimension, so that a rank reads only its own experts from a fused ``[E, ...]`` tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_moe.data.tokenizer import Tokenizer
from lightning_moe.io.atomic import atomic_file, atomic_path

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model directory, as a dict.

    Raises:
        FileNotFoundError: if ``path`` is not a directory with a ``config.json``.
    """
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(config_file)!r} does not exist; pass a local Hugging Face model directory (with config.json and "
            "*.safetensors files). Nothing is downloaded: fetch the model first, e.g. `hf download <repo> --local-dir DIR`"
        )
    return json.loads(config_file.read_text())


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config.json`` (sorted keys, as ``transformers`` writes it)."""
    with atomic_file(Path(path) / CONFIG_NAME, "w") as f:  # a kill leaves the old file or the new one
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


class SafetensorsDirectory:
    """The tensors of a model directory's safetensors files, opened lazily, by name.

    Use as a context manager; files are opened on first use and closed on exit. Names, shapes and
    dtypes come from the file headers (no tensor data is read until :meth:`read`).

    Args:
        path: the model directory; its ``model.safetensors.index.json`` (if any) maps names to
            files, otherwise every ``*.safetensors`` file in it is used.

    Raises:
        FileNotFoundError: if the directory has no safetensors file.
        ValueError: if two files hold a tensor of the same name.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors file in {str(self.path)!r}; lightning_moe reads safetensors checkpoints only "
                "(convert *.bin files with transformers' save_pretrained first)"
            )
        self.files = files
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        # Headers are authoritative (an index can be stale): list every file's tensors.
        for name in files:
            for key in self._open(name).keys():
                if key in self._file_of:
                    raise ValueError(
                        f"tensor {key!r} is stored twice, in {self._file_of[key]!r} and {name!r}; remove one copy"
                    )
                self._file_of[key] = name

    def _open(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            full = self.path / file
            if not full.is_file():
                raise FileNotFoundError(f"{str(full)!r}, listed in {INDEX_NAME}, does not exist")
            self._handles[file] = self._stack.enter_context(safe_open(str(full), framework="pt", device="cpu"))
        return self._handles[file]

    def __enter__(self) -> SafetensorsDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every opened file."""
        self._stack.close()
        self._handles.clear()

    def names(self) -> set[str]:
        """Every tensor name in the directory's files."""
        return set(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the file header)."""
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``name``, or only its rows ``[start, stop)`` of the first dimension."""
        handle = self._open(self._file_of[name])
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[rows[0] : rows[1]]


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or as numbered shards plus an index when larger than one shard.

    Args:
        path: the output directory (created if missing).
        tensors: name to tensor; written contiguous, on the CPU.
        max_shard_bytes: largest shard size (transformers' default: 5 GiB).
        metadata: the files' metadata (``{"format": "pt"}`` by default, as transformers writes).

    Returns:
        The file names written.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    metadata = metadata or {"format": "pt"}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        with atomic_path(out / SINGLE_FILE_NAME) as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
        (out / INDEX_NAME).unlink(missing_ok=True)
        return [SINGLE_FILE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards, strict=True):
        with atomic_path(out / file) as tmp:
            save_file(shard, str(tmp), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic_file(out / INDEX_NAME, "w") as f:  # the index last: it names only complete files
        f.write(json.dumps(index, indent=2) + "\n")
    return names


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory (its ``tokenizer.json``, roles from ``tokenizer_config.json``).

    The project's one tokenizer class, :class:`lightning_moe.data.Tokenizer`;
    ``.backend_tokenizer`` is the ``tokenizers.Tokenizer``.

    Raises:
        FileNotFoundError: if the directory has no ``tokenizer.json``.
    """
    if not (Path(path) / TOKENIZER_NAME).is_file():
        raise FileNotFoundError(
            f"{str(Path(path) / TOKENIZER_NAME)!r} does not exist; the directory needs a fast-tokenizer file "
            "(tokenizer.json), which transformers' tokenizer.save_pretrained writes"
        )
    return Tokenizer.load(path)


def copy_tokenizer_files(
    src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str] = TOKENIZER_FILES
) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in names:
        file = Path(src) / name
        if file.is_file():
            Path(dst).mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(dst) / name) as f:
                f.write(file.read_bytes())
            copied.append(name)
    return copied


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of ``config.json``'s ``dtype``)."""
    return str(dtype).removeprefix("torch.")


__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SafetensorsDirectory",
    "copy_tokenizer_files",
    "dtype_name",
    "load_hf_tokenizer",
    "read_config",
    "write_config",
    "write_safetensors",
]
