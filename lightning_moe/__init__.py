"""lightning_moe: Mixture-of-Experts training for PyTorch Lightning."""

from lightning_moe.moe import MoE, MoEStats

__all__ = ["MoE", "MoEStats"]
__version__ = "0.1.0.dev0"
