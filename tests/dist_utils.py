"""Helpers of the multi-process test workers (importable both under pytest and when a test file runs as a script)."""

from __future__ import annotations

import torch.distributed as dist


def shut_down() -> None:
    """Destroy the process group before the worker exits.

    gloo torn down at interpreter exit, with its threads still running, can abort the process
    ("terminate called without an active exception"); a barrier first lets every rank finish.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
