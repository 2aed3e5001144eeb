"""``lightning-moe upcycle``: a dense checkpoint (ours or a Hugging Face directory) turned into an MoE one.

::

    lightning-moe upcycle --ckpt DENSE.ckpt --num-experts 8 --top-k 1 --granularity 2 --moe-every 2 --out MOE.ckpt
    lightning-moe upcycle --ckpt llama_dir --num-experts 8 --top-k 2 --out mixtral_dir

A Lightning checkpoint (``MultitaskTranslationModule``, ``LanguageModelModule`` or
``CausalLMModule``) gives a model checkpoint (weights, hyper-parameters with the MoE settings, the
tokenizer; no training state): ``lightning-moe fit -c RECIPE --ckpt_path MOE.ckpt`` continues
training from it at step 0. A Hugging Face directory (dense Llama or Qwen3) gives a Hugging Face
directory of the MoE family (Mixtral, Qwen3-MoE) with the tokenizer files copied. The upcycled
model computes the dense model's function (dropless routing, renormalised weights; see
:mod:`lightning_moe.surgery.upcycle`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_moe.models import (
    GPT,
    DecoderConfig,
    EncoderDecoderTransformer,
    GPTConfig,
    MoEDecoder,
    TransformerConfig,
)
from lightning_moe.surgery.checkpoints import SurgeryError, load_checkpoint_dict, model_checkpoint, save_checkpoint_dict
from lightning_moe.surgery.upcycle import upcycle

_PREFIX = "model."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe upcycle",
        description="Turn a dense model into an MoE model that computes the same function (sparse upcycling).",
    )
    parser.add_argument(
        "--ckpt", required=True, help="dense checkpoint (.ckpt) or Hugging Face directory (Llama, Qwen3)"
    )
    parser.add_argument("--num-experts", type=int, required=True, help="E, experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=1, help="K, FFN copies per token (default 1)")
    parser.add_argument(
        "--granularity", type=int, default=1,
        help="m, slices of each FFN copy (fine-grained experts of width d_ff/m; the router picks K*m); default 1",
    )  # fmt: skip
    parser.add_argument(
        "--moe-every", type=int, default=1, help="layer i becomes MoE when (i+1) %% N == 0 (1: every layer; 2: M3's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    parser.add_argument("--out", required=True, help="output checkpoint file, or directory for a Hugging Face input")
    return parser


def _config_source(hparams: Mapping[str, Any]) -> dict[str, Any]:
    config = hparams.get("config")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    return dict(hparams)  # checkpoints of modules that took the model fields flat


def _dense_model(checkpoint: Mapping[str, Any]) -> nn.Module:
    """The model of a Lightning checkpoint, built from its hyper-parameters and loaded strictly."""
    state = {k[len(_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_PREFIX)}
    source = _config_source(checkpoint.get("hyper_parameters", {}))
    cls: type[nn.Module]
    if any(k.startswith("encoder.") for k in state):
        cls, config_cls, vocab_key = EncoderDecoderTransformer, TransformerConfig, "embed.weight"
    elif any(k.startswith("blocks.") for k in state):
        cls, config_cls, vocab_key = GPT, GPTConfig, "embed.weight"
    elif any(k.startswith("layers.") for k in state):
        cls, config_cls, vocab_key = MoEDecoder, DecoderConfig, "embed_tokens.weight"
    else:
        raise SurgeryError("the checkpoint holds no lightning_moe model (model.encoder/blocks/layers weights)")
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = {k: v for k, v in source.items() if k in names}
    fields["vocab_size"] = int(state[vocab_key].shape[0])
    model = cls(config_cls(**fields))
    model.load_state_dict(state, strict=True)
    return model


def _upcycled_hparams(hparams: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """``hparams`` with the upcycled model's config, in the form the module took it (nested or flat).

    The vocabulary size stays as the module had it (``None``: taken from its tokenizer).
    """
    out = dict(hparams)
    old = out.get("config")
    if dataclasses.is_dataclass(old) and not isinstance(old, type):
        out["config"] = dataclasses.replace(config, vocab_size=getattr(old, "vocab_size", config.vocab_size))
        return out
    if isinstance(old, Mapping):
        out["config"] = {**dataclasses.asdict(config), "vocab_size": old.get("vocab_size", config.vocab_size)}
        return out
    if config.top_k == 1 and "normalize_top_k" not in out:
        raise SurgeryError(
            "this checkpoint's module takes flat hyper-parameters without normalize_top_k, so a top-1 upcycled model "
            "would keep raw router probabilities; use --top-k 2 or --granularity 2"
        )
    for key, value in dataclasses.asdict(config).items():
        if key in out and key != "vocab_size":
            out[key] = value
    return out


def upcycle_checkpoint(
    ckpt: str, out: str, num_experts: int, top_k: int, granularity: int, moe_every: int, seed: int
) -> dict[str, Any]:
    """Upcycle a Lightning checkpoint's model and write a model checkpoint; returns it."""
    checkpoint = load_checkpoint_dict(ckpt)
    dense = _dense_model(checkpoint).eval()
    try:
        moe = upcycle(dense, num_experts, top_k, granularity, moe_every, seed)
    except ValueError as e:
        raise SurgeryError(str(e)) from None
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(_PREFIX)}
    state.update({f"{_PREFIX}{k}": v for k, v in moe.state_dict().items()})
    hparams = _upcycled_hparams(checkpoint.get("hyper_parameters", {}), moe.config)
    record = {
        "operation": "upcycle", "num_experts": num_experts, "top_k": top_k, "granularity": granularity,
        "moe_every": moe_every, "seed": seed,
    }  # fmt: skip
    result = model_checkpoint(checkpoint, state, hparams, record)
    save_checkpoint_dict(result, out)
    return result


def upcycle_hf(
    hf_dir: str, out: str, num_experts: int, top_k: int, granularity: int, moe_every: int, seed: int
) -> MoEDecoder:
    """Upcycle a dense Hugging Face directory into a Hugging Face directory of its MoE family."""
    from lightning_moe.hf import load_hf_model, save_hf_model

    dense = load_hf_model(hf_dir)
    moe = upcycle(dense, num_experts, top_k, granularity, moe_every, seed)
    save_hf_model(moe, out, tokenizer_dir=hf_dir)
    return moe


def main(argv: Sequence[str]) -> int:
    """``lightning-moe upcycle``; returns the exit code (2 with a one-line error on bad input)."""
    from lightning_moe.hf import is_hf_directory

    args = _parser().parse_args(list(argv))
    options = (args.num_experts, args.top_k, args.granularity, args.moe_every, args.seed)
    try:
        if is_hf_directory(args.ckpt):
            moe = upcycle_hf(args.ckpt, args.out, *options)
            print(f"wrote {args.out}: {moe.config.family}, {len(moe.config.moe_indices())} MoE layers")
        else:
            result = upcycle_checkpoint(args.ckpt, args.out, *options)
            n = sum(k.endswith(".router.weight") for k in result["state_dict"])
            print(
                f"wrote {args.out}: {n} MoE layers of {args.num_experts} experts (top-{args.top_k * args.granularity})"
            )
    except (SurgeryError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "upcycle_checkpoint", "upcycle_hf"]
