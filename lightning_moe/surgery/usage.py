"""How often each expert of each MoE layer is chosen over a dataset.

Legend: E experts of a layer, B batch, S source positions, L target positions.

Usage is the number of (token, choice) assignments the router makes to each expert, before capacity
(a dropped choice still counts: the router chose it). Counting runs the model in eval mode with every
MoE layer dropless, so the routing of a layer does not depend on what capacity dropped in the layers
before it; translation data is run teacher-forced (source through the encoder, reference through the
decoder), so decoder usage is counted on reference tokens.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.moe.layer import moe_layers
from lightning_moe.surgery.checkpoints import SurgeryError, restore_capacity, set_dropless

__all__ = [
    "count_expert_usage",
    "translation_batches",
    "translation_examples",
    "translation_module",
    "translation_usage",
]


@torch.no_grad()
def count_expert_usage(
    module: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, Tensor]:
    """Count the router's assignments per expert of every MoE layer of ``module`` over ``batches``.

    Args:
        module: a module holding :class:`~lightning_moe.moe.MoE` layers (all experts local).
        batches: inputs for ``forward``.
        forward: ``forward(module, batch)`` runs one batch; ``None`` calls ``module(batch)``.

    Returns:
        ``{layer name: counts [E] float64}``, names as in ``module.named_modules()`` (so for a
        LightningModule they are the state-dict prefixes of the layers).

    Raises:
        SurgeryError: if ``module`` has no MoE layer or a layer's experts are sharded.
    """
    layers = moe_layers(module)
    if not layers:
        raise SurgeryError("the model has no MoE layer, so there is no expert usage to count; pass an MoE checkpoint")
    for name, layer in layers:
        if layer.num_local_experts != layer.num_experts:
            raise SurgeryError(
                f"MoE layer {name!r} holds {layer.num_local_experts} of {layer.num_experts} experts (sharded); "
                "count usage on a consolidated, unsharded model"
            )
    counts = {name: torch.zeros(layer.num_experts, dtype=torch.float64) for name, layer in layers}
    run = forward or (lambda m, b: m(b))
    was_training = module.training
    saved = set_dropless(module)
    module.eval()
    try:
        for batch in batches:
            run(module, batch)
            for name, layer in layers:
                stats = layer.last_stats
                if stats is not None:
                    counts[name] += stats.tokens_per_expert.detach().to("cpu", torch.float64)
                layer.last_stats = None
    finally:
        restore_capacity(saved)
        module.train(was_training)
    return counts


def translation_examples(
    data: str | os.PathLike | None = None,
    split: str = "validation",
    direction: str | None = None,
    languages: Sequence[str] | None = None,
) -> list[tuple[str, str, str]]:
    """``(source text, reference text, target language)`` examples of a parallel corpus, both directions.

    Every pair ``a-b`` gives the direction ``a-b`` and ``b-a`` (as validation does).

    Args:
        data: a corpus directory (``{split}.jsonl[.gz]`` or line-aligned files, see docs/data.md), a
            single ``.jsonl[.gz]`` file (all of it, ``split`` ignored), or ``None`` for the bundled corpus.
        split: ``"train"``, ``"validation"`` or ``"test"`` of a directory.
        direction: keep only this direction, e.g. ``"en-de"``; ``None`` keeps all.
        languages: keep only pairs of these languages (a model's languages); ``None`` keeps all.

    Returns:
        The examples, in corpus order.

    Raises:
        SurgeryError: if the split or the direction has no example.
    """
    from lightning_moe.data.corpus import SPLITS, bundled_corpus_dir, read_corpus, read_jsonl

    source = bundled_corpus_dir() if data is None else Path(data)
    if source.is_file():
        pairs = read_jsonl(source)
        where = str(source)
    else:
        if split not in SPLITS:
            raise SurgeryError(f"split={split!r} is not a split; choose one of {SPLITS}")
        pairs = read_corpus(source)[split]
        where = f"the {split} split of {source}"
    if languages is not None:
        known = set(languages)
        pairs = [p for p in pairs if p.src_lang in known and p.tgt_lang in known]
        where += f" (pairs of the model's languages {sorted(known)})"
    examples = []
    for p in pairs:
        examples.append((p.src, p.tgt, p.tgt_lang, f"{p.src_lang}-{p.tgt_lang}"))
        examples.append((p.tgt, p.src, p.src_lang, f"{p.tgt_lang}-{p.src_lang}"))
    if direction is not None:
        available = sorted({d for *_, d in examples})
        examples = [e for e in examples if e[3] == direction]
        if not examples:
            raise SurgeryError(
                f"direction {direction!r} has no example in {where}; choose one of {available} (SRC-TGT)"
            )
    if not examples:
        raise SurgeryError(f"{where} holds no sentence pair; pass a corpus with pairs to count expert usage on")
    return [(src, tgt, lang) for src, tgt, lang, _ in examples]


def translation_batches(
    tokenizer: Any, examples: Sequence[tuple[str, str, str]], max_length: int, batch_size: int = 64
) -> list[dict[str, Tensor]]:
    """Teacher-forcing batches in the datamodule's format: ``<2tgt> src </s>``, ``<2tgt> tgt``, ``tgt </s>``.

    Args:
        tokenizer: the model's tokenizer (``encode``, ``lang_token_id``, ``eos_id``, ``pad_id``).
        examples: ``(source, reference, target language)`` triples.
        max_length: most tokens of a source or a target, specials included.
        batch_size: examples per batch.
    """
    pad = int(tokenizer.pad_id)

    def padded(rows: list[list[int]]) -> Tensor:
        out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    batches = []
    for start in range(0, len(examples), batch_size):
        src_rows, tgt_in_rows, tgt_out_rows = [], [], []
        for src, tgt, lang in examples[start : start + batch_size]:
            tag = tokenizer.lang_token_id(lang)
            target = list(tokenizer.encode(tgt))[: max_length - 1]
            src_rows.append([tag, *list(tokenizer.encode(src))[: max_length - 2], tokenizer.eos_id])
            tgt_in_rows.append([tag, *target])
            tgt_out_rows.append([*target, tokenizer.eos_id])
        batches.append({"src_ids": padded(src_rows), "tgt_in": padded(tgt_in_rows), "tgt_out": padded(tgt_out_rows)})
    return batches


def translation_usage(
    module: Any,
    data: str | os.PathLike | None = None,
    split: str = "validation",
    direction: str | None = None,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Expert usage of a :class:`~lightning_moe.MultitaskTranslationModule` over a parallel corpus.

    Pairs in a language the model does not know are skipped.

    Args:
        module: the module, with its tokenizer attached (as loaded from a checkpoint).
        data: corpus directory, ``.jsonl[.gz]`` file, or ``None`` for the bundled corpus.
        split: the split of a directory to count on.
        direction: count on this translation direction only (``"de-en"``): the experts one language
            pair uses.
        batch_size: sentences per forward.

    Returns:
        ``{layer name: counts [E] float64}``; see :func:`count_expert_usage`.
    """
    examples = translation_examples(data, split, direction, list(module.tokenizer.languages))
    max_length = int(module.model.config.max_positions)
    batches = translation_batches(module.tokenizer, examples, max_length, batch_size)
    device = next(module.parameters()).device

    def forward(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return m(batch["src_ids"].to(device), batch["tgt_in"].to(device))  # padding masks from the tokenizer

    return count_expert_usage(module, batches, forward)


def translation_module(checkpoint: Mapping[str, Any], where: str = "the checkpoint") -> Any:
    """A :class:`~lightning_moe.MultitaskTranslationModule` in eval mode from a checkpoint dict.

    Raises:
        SurgeryError: if the checkpoint is not one of a translation module with its tokenizer.
    """
    from lightning_moe.modules.translation import MultitaskTranslationModule

    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    buffer.seek(0)
    try:
        module = MultitaskTranslationModule.load_from_checkpoint(buffer, map_location="cpu", weights_only=False)
    except (TypeError, KeyError, RuntimeError) as e:
        raise SurgeryError(
            f"{where} does not load as a MultitaskTranslationModule ({type(e).__name__}: {str(e)[:200]}); usage is "
            "counted on translation checkpoints"
        ) from e
    if module.tokenizer is None:
        raise SurgeryError(f"{where} carries no tokenizer, so expert usage cannot be counted on text")
    return module.eval()
