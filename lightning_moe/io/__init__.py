"""Crash-safe reading and writing of files and checkpoints."""

from lightning_moe.io.atomic import (
    AtomicDirectory,
    atomic_directory,
    atomic_file,
    atomic_path,
    atomic_save,
    fsync_directory,
    recover_directory,
)
from lightning_moe.io.checkpoint_io import AtomicCheckpointIO
from lightning_moe.io.checkpoint_loader import CheckpointLoadError, checkpoint_file, load_checkpoint

__all__ = [
    "AtomicCheckpointIO",
    "AtomicDirectory",
    "CheckpointLoadError",
    "atomic_directory",
    "atomic_file",
    "atomic_path",
    "atomic_save",
    "checkpoint_file",
    "fsync_directory",
    "load_checkpoint",
    "recover_directory",
]
