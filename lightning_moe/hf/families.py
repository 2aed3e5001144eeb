"""The families ``lightning_moe.hf`` reads and writes, by ``config.json`` ``model_type``."""

from __future__ import annotations

from types import MappingProxyType

from lightning_moe.hf.adapter import FamilyAdapter
from lightning_moe.hf.deepseek_v3 import DeepseekV3Adapter
from lightning_moe.hf.llama import LlamaAdapter, Qwen3Adapter
from lightning_moe.hf.mixtral import MixtralAdapter
from lightning_moe.hf.olmoe import OlmoeAdapter
from lightning_moe.hf.qwen2_moe import Qwen2MoeAdapter
from lightning_moe.hf.qwen3_moe import Qwen3MoeAdapter

ADAPTER_CLASSES: tuple[type[FamilyAdapter], ...] = (
    MixtralAdapter,
    Qwen3MoeAdapter,
    Qwen2MoeAdapter,
    OlmoeAdapter,
    DeepseekV3Adapter,
    LlamaAdapter,
    Qwen3Adapter,
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for cls in ADAPTER_CLASSES for t in cls.model_types)
# The MoE family a dense family becomes when upcycled.
UPCYCLED_FAMILY = MappingProxyType({"llama": "mixtral", "qwen3": "qwen3_moe"})


def adapter_for(model_type: str | None) -> FamilyAdapter:
    """The adapter of ``model_type``.

    Raises:
        ValueError: for an unsupported or missing model type, listing the supported ones.
    """
    for cls in ADAPTER_CLASSES:
        if model_type in cls.model_types:
            return cls()
    raise ValueError(
        f"model_type={model_type!r} is not supported by lightning_moe.hf; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = ["ADAPTER_CLASSES", "SUPPORTED_MODEL_TYPES", "UPCYCLED_FAMILY", "adapter_for"]
