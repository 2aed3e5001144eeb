"""``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` with crash-safe single-file writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from typing_extensions import override

from lightning_moe.io.atomic import atomic_save
from lightning_moe.io.checkpoint_loader import CheckpointLoadError, read_checkpoint_file

__all__ = ["AtomicCheckpointIO"]


def _is_local(path: _PATH) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint file atomically beside its destination, and read files safely.

    Writes: see :mod:`lightning_moe.io.atomic`.

    Lightning's default writes through an fsspec transaction whose temporary file lives in
    ``$TMPDIR``; where that is another filesystem (a tmpfs) the final move is a copy, and a kill
    during it leaves a truncated ``last.ckpt`` and an orphan in ``$TMPDIR``. This plugin writes
    ``.<name>.<random>.tmp`` in the checkpoint's own folder, fsyncs it and renames it over the
    destination, so a kill at any moment leaves the previous checkpoint loadable. Remote paths
    (``s3://`` and other fsspec protocols) keep Lightning's behaviour.

    Reads: a local file is loaded with ``weights_only=True`` and the project's allowlist
    (:mod:`lightning_moe.io.checkpoint_loader`), so resuming from an untrusted file cannot run code,
    and a missing, empty, truncated or foreign file raises a one-line
    :class:`~lightning_moe.io.CheckpointLoadError`; only an explicit ``weights_only=False`` trusts the
    file with the full unpickler.

    The ``lightning-moe`` command uses it by default; with a plain ``Trainer`` pass
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` with ``torch.save``, atomically.

        Args:
            checkpoint: what the Trainer dumped.
            path: the destination file.
            storage_options: unsupported, as in ``TorchCheckpointIO``.

        Raises:
            TypeError: if ``storage_options`` is given.
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, os.fspath(path))

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint file safely (see the class docstring).

        Args:
            path: the checkpoint file.
            map_location: where tensors go, as in ``torch.load``.
            weights_only: ``False`` trusts the file (full unpickler); ``None`` or ``True``: the allowlist.

        Returns:
            The checkpoint dict.

        Raises:
            CheckpointLoadError: if the file is missing, empty, truncated or holds foreign objects.
        """
        if weights_only is False or not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        p = Path(os.fspath(path))
        if not p.is_file():
            raise CheckpointLoadError(
                f"checkpoint {str(path)!r} does not exist or is not a file; pass the path of a .ckpt file"
            )
        return read_checkpoint_file(p, map_location)
