"""Which implementation a MoE stage runs: the torch reference or the Triton kernels.

``"torch"`` is the reference (every device and dtype), ``"triton"`` the fused kernels (CUDA),
``"auto"`` Triton on CUDA and torch elsewhere. Each stage module (router, experts) holds its
``backend`` and decides per call from its input, inside its own ``forward``, so that hooks on the
module (FSDP2's parameter gathering, activation checkpointing) see every kernel call.
"""

from __future__ import annotations

from torch import Tensor

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def validate_backend(backend: str) -> None:
    """Raise ``ValueError`` naming ``backend`` if it is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")


def uses_triton(backend: str, x: Tensor) -> bool:
    """Whether a stage with ``backend`` runs the Triton kernels on input ``x``.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        x: the stage's input (its device decides ``"auto"``).

    Returns:
        True for Triton; with ``backend="triton"`` where Triton cannot run, False and a warning.
    """
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return False
    from lightning_moe.kernels.availability import triton_available

    return triton_available(x.device, warn=backend == "triton")


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (e.g. its experts of an expert-parallel weight), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


__all__ = ["BACKENDS", "local_tensor", "uses_triton", "validate_backend"]
