"""Hugging Face checkpoints in and out: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3 (and dense Llama/Qwen3).

``load_hf_model(path)`` reads ``config.json`` and the safetensors of a local directory into a
:class:`~lightning_moe.models.MoEDecoder`; ``save_hf_model(model, path)`` writes files that
``transformers`` loads. Shared file I/O is in :mod:`lightning_moe.hf.io`, the tensor map in
:mod:`lightning_moe.hf.adapter`, and one small adapter per family beside them.
"""

from lightning_moe.hf.families import SUPPORTED_MODEL_TYPES, UPCYCLED_FAMILY, adapter_for
from lightning_moe.hf.io import load_hf_tokenizer
from lightning_moe.hf.load import checkpoint_dtype, hf_decoder_config, is_hf_directory, load_hf_model, load_hf_weights
from lightning_moe.hf.save import hf_state_dict, save_hf_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UPCYCLED_FAMILY",
    "adapter_for",
    "checkpoint_dtype",
    "hf_decoder_config",
    "hf_state_dict",
    "is_hf_directory",
    "load_hf_model",
    "load_hf_tokenizer",
    "load_hf_weights",
    "save_hf_model",
]
