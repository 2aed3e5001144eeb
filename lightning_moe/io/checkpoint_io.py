"""``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` with crash-safe single-file writes."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from typing_extensions import override

from lightning_moe.io.atomic import atomic_save

__all__ = ["AtomicCheckpointIO"]


def _is_local(path: _PATH) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint file atomically beside its destination (see :mod:`lightning_moe.io.atomic`).

    Lightning's default writes through an fsspec transaction whose temporary file lives in
    ``$TMPDIR``; where that is another filesystem (a tmpfs) the final move is a copy, and a kill
    during it leaves a truncated ``last.ckpt`` and an orphan in ``$TMPDIR``. This plugin writes
    ``.<name>.<random>.tmp`` in the checkpoint's own folder, fsyncs it and renames it over the
    destination, so a kill at any moment leaves the previous checkpoint loadable. Remote paths
    (``s3://`` and other fsspec protocols) keep Lightning's behaviour.

    The ``lightning-moe`` command and :class:`~lightning_moe.ExpertParallelStrategy` use it by
    default; with a plain ``Trainer`` pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
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
