"""``lightning-moe convert``: Hugging Face directory <-> lightning_moe checkpoint.

::

    lightning-moe convert --from-hf DIR --out CKPT        # a CausalLMModule model checkpoint
    lightning-moe convert --ckpt CKPT --to-hf DIR         # e.g. the checkpoint of a fine-tuning run

``--from-hf`` writes a model checkpoint (weights, the resolved :class:`~lightning_moe.models.DecoderConfig`
as hyper-parameters, no training state) that ``CausalLMModule.load_from_checkpoint`` and
``lightning-moe fit -c recipes/hf_finetune.yaml --ckpt_path CKPT`` read. ``--to-hf`` accepts such a
checkpoint, a Lightning checkpoint of a ``CausalLMModule`` run, or an expert-sharded checkpoint
directory, and writes ``config.json`` + safetensors that transformers loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lightning_moe.models import DecoderConfig, MoEDecoder
from lightning_moe.moe.router import Router

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe convert",
        description="Convert between a local Hugging Face model directory and a lightning_moe checkpoint.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-hf", metavar="DIR", help="Hugging Face directory to read (config.json + safetensors)"
    )
    direction.add_argument("--to-hf", metavar="DIR", help="Hugging Face directory to write (with --ckpt)")
    parser.add_argument("--out", help="checkpoint file to write (with --from-hf)")
    parser.add_argument("--ckpt", help="checkpoint to read (with --to-hf): a .ckpt file or a sharded directory")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="tensor dtype (default: unchanged)")
    parser.add_argument(
        "--layout", choices=("per_expert", "fused"), default="per_expert",
        help="expert tensors written by --to-hf: per_expert (every transformers version; default) or fused",
    )  # fmt: skip
    parser.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here (with --to-hf)")
    return parser


def hf_to_checkpoint(hf_dir: str, out: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Write the model of ``hf_dir`` as a ``CausalLMModule`` model checkpoint; returns the checkpoint dict."""
    import lightning

    from lightning_moe.hf import load_hf_model
    from lightning_moe.modules.causal_lm import CausalLMModule
    from lightning_moe.surgery.checkpoints import save_checkpoint_dict

    model = load_hf_model(hf_dir, dtype=dtype)
    module = CausalLMModule(config=model.config)
    hparams = dict(module.hparams)
    hparams["pretrained"] = None
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "optimizer_states": [],
        "lr_schedulers": [],
        "lightning_moe_source": {"hf_dir": str(hf_dir)},
    }
    save_checkpoint_dict(checkpoint, out)
    return checkpoint


def decoder_from_checkpoint(checkpoint: dict[str, Any]) -> MoEDecoder:
    """The :class:`MoEDecoder` of a ``CausalLMModule`` checkpoint dict.

    Raises:
        ValueError: if the checkpoint is not a ``CausalLMModule`` one, or its weights do not fit.
    """
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    names = {f.name for f in dataclasses.fields(DecoderConfig)}
    if not isinstance(config, dict) or not {"d_model", "n_layers", "family"} <= set(config) or set(config) - names:
        raise ValueError(
            "the checkpoint holds no DecoderConfig hyper-parameters; --to-hf converts checkpoints of CausalLMModule "
            "(lightning-moe convert --from-hf, or a run of recipes/hf_finetune.yaml)"
        )
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = MoEDecoder(DecoderConfig(**config))
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, Router) and module.expert_load is not None:
            module.expert_load = torch.zeros(module.num_experts)  # not in checkpoints: no tokens counted yet
    return model


def checkpoint_to_hf(
    ckpt: str, out: str, dtype: torch.dtype | None = None, layout: str = "per_expert", tokenizer_dir: str | None = None
) -> MoEDecoder:
    """Write the model of a ``CausalLMModule`` checkpoint as a Hugging Face directory; returns the model."""
    from lightning_moe.hf import save_hf_model
    from lightning_moe.surgery.checkpoints import load_checkpoint_dict

    model = decoder_from_checkpoint(load_checkpoint_dict(ckpt))
    save_hf_model(model, out, layout=layout, dtype=dtype, tokenizer_dir=tokenizer_dir)
    return model


def main(argv: Sequence[str]) -> int:
    """``lightning-moe convert``; returns the exit code (2 with a one-line error on bad input)."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    dtype = None if args.dtype is None else _DTYPES[args.dtype]
    try:
        if args.from_hf is not None:
            if args.out is None:
                parser.error("--from-hf needs --out CKPT")
            checkpoint = hf_to_checkpoint(args.from_hf, args.out, dtype)
            n = sum(v.numel() for v in checkpoint["state_dict"].values())
            print(f"wrote {args.out}: {checkpoint['hyper_parameters']['config']['family']}, {n:,} parameters")
        else:
            if args.ckpt is None:
                parser.error("--to-hf needs --ckpt CKPT")
            model = checkpoint_to_hf(args.ckpt, args.to_hf, dtype, args.layout, args.tokenizer_dir)
            print(f"wrote {args.to_hf}: {model.config.family} ({args.layout} experts)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["checkpoint_to_hf", "decoder_from_checkpoint", "hf_to_checkpoint", "main"]
