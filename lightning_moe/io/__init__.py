"""Crash-safe reading and writing of files and checkpoints."""

from lightning_moe.io.atomic import (
    AtomicDirectory,
    atomic_directory,
    atomic_file,
    atomic_save,
    fsync_directory,
    recover_directory,
)
from lightning_moe.io.checkpoint_io import AtomicCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "AtomicDirectory",
    "atomic_directory",
    "atomic_file",
    "atomic_save",
    "fsync_directory",
    "recover_directory",
]
