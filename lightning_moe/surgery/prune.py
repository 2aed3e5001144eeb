"""Expert pruning for inference (Kim et al. 2021): keep the N most-used experts of every MoE layer.

Legend: E experts of a layer before pruning, N kept.

Usage is counted on a dataset (:mod:`lightning_moe.surgery.usage`): the validation split, a given
file, or one translation direction (the experts one language pair uses). Pruning slices the router
rows and the stacked expert weights of every layer to the kept experts, in their original order, and
sets ``num_experts = N`` in the hyper-parameters, so every command loads the result as an ordinary
model with N experts per layer.

What pruning preserves: with every expert kept the model is unchanged (bit-identical outputs). With
top-k >= 2 the combine weights are renormalised over the chosen experts, so in dropless mode pruning
experts that no token of a dataset selects leaves that dataset's outputs unchanged (up to rounding of
the softmax). With top-1 the combine weight is the softmax probability over all experts, which grows
when experts are removed, so outputs change even then.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_moe.surgery.checkpoints import (
    SurgeryError,
    expert_tensor_keys,
    layer_num_experts,
    load_checkpoint_dict,
    model_checkpoint,
    moe_layer_names,
    num_experts_of,
    save_checkpoint_dict,
    top_k_of,
    with_num_experts,
)

__all__ = ["SELECTIONS", "prune_checkpoint", "prune_experts", "select_experts"]

#: How :func:`select_experts` chooses: by usage (the paper's method) or at random (its comparison).
SELECTIONS = ("most-used", "random")


def select_experts(
    usage: Mapping[str, Tensor], keep: int, selection: str = "most-used", seed: int = 0
) -> dict[str, list[int]]:
    """The experts to keep in every layer, in ascending index order.

    Args:
        usage: ``{layer: counts [E]}``, e.g. from :func:`~lightning_moe.surgery.translation_usage`.
        keep: N, experts kept per layer, ``1 <= N <= E``.
        selection: ``"most-used"``: the N largest counts (ties go to the lower index); ``"random"``: N
            experts drawn uniformly per layer (seeded by ``seed``), ignoring the counts.
        seed: seed of the random selection.

    Returns:
        ``{layer: sorted kept expert indices}``.

    Raises:
        SurgeryError: if ``keep`` is out of range or ``selection`` is unknown.
    """
    if selection not in SELECTIONS:
        raise SurgeryError(f"selection={selection!r} is not supported; choose one of {SELECTIONS}")
    rng = random.Random(seed)
    kept = {}
    for name, counts_E in usage.items():
        E = int(counts_E.numel())
        if not 1 <= keep <= E:
            raise SurgeryError(f"keep={keep} must be between 1 and the {E} experts of MoE layer {name!r}")
        if selection == "random":
            kept[name] = sorted(rng.sample(range(E), keep))
        else:
            order = sorted(range(E), key=lambda e: (-float(counts_E[e]), e))
            kept[name] = sorted(order[:keep])
    return kept


def prune_checkpoint(checkpoint: Mapping[str, Any], kept: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Slice every MoE layer of a checkpoint to its kept experts.

    Every MoE layer must keep the same number of experts (the model has one ``num_experts``).

    Args:
        checkpoint: a Lightning checkpoint dict of a lightning_moe module.
        kept: ``{layer: expert indices}`` for every MoE layer of the checkpoint.

    Returns:
        A model checkpoint (no optimizer or loop state) with ``num_experts = N``.

    Raises:
        SurgeryError: if a layer is missing from ``kept``, kept indices are out of range or repeated,
            the layers keep different numbers of experts, or ``N`` is below the model's ``top_k``.
    """
    state_dict = dict(checkpoint["state_dict"])
    layers = moe_layer_names(state_dict)
    if not layers:
        raise SurgeryError("the checkpoint has no MoE layer (no '<layer>.router.weight' key); pass an MoE checkpoint")
    missing, extra = sorted(set(layers) - set(kept)), sorted(set(kept) - set(layers))
    if missing or extra:
        raise SurgeryError(
            f"kept experts are given for layers {sorted(kept)} but the checkpoint's MoE layers are {layers}; "
            "give kept experts for exactly these layers"
        )
    sizes = {len(kept[name]) for name in layers}
    if len(sizes) != 1:
        raise SurgeryError(
            f"MoE layers would keep different numbers of experts ({ {n: len(kept[n]) for n in layers} }); the model "
            "has one num_experts, so keep the same number in every layer"
        )
    keep = sizes.pop()
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    top_k = top_k_of(hparams)
    if keep < top_k:
        raise SurgeryError(f"keep={keep} is below the model's top_k={top_k}; keep at least {top_k} experts")
    for name in layers:
        E = layer_num_experts(state_dict, name)
        indices = [int(e) for e in kept[name]]
        bad = [e for e in indices if not 0 <= e < E]
        if bad or len(set(indices)) != len(indices):
            raise SurgeryError(
                f"kept experts {indices} of MoE layer {name!r} must be distinct indices in [0, {E}); got "
                f"{'out-of-range ' + str(bad) if bad else 'repeats'}"
            )
        index = torch.tensor(indices, dtype=torch.long)
        for key in expert_tensor_keys(state_dict, name):
            state_dict[key] = state_dict[key].index_select(0, index).clone()
    before = num_experts_of(hparams)
    record = {
        "operation": "prune",
        "num_experts_before": before,
        "num_experts_after": keep,
        "kept": {name: [int(e) for e in kept[name]] for name in layers},
    }
    return model_checkpoint(checkpoint, state_dict, with_num_experts(hparams, keep), record)


def prune_experts(
    ckpt: str | os.PathLike,
    keep: int,
    out: str | os.PathLike | None = None,
    *,
    data: str | os.PathLike | None = None,
    split: str = "validation",
    direction: str | None = None,
    selection: str = "most-used",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Count expert usage of a translation checkpoint on a dataset and keep the ``keep`` most-used experts.

    Args:
        ckpt: a :class:`~lightning_moe.MultitaskTranslationModule` checkpoint (file or sharded directory).
        keep: experts kept per MoE layer.
        out: where to write the pruned checkpoint; ``None`` writes nothing.
        data: corpus directory or ``.jsonl[.gz]`` file to count usage on; ``None``: the bundled corpus.
        split: split of a corpus directory (``"validation"`` by default, as in the paper).
        direction: count on this direction only (``"de-en"``): a model for one language pair.
        selection: ``"most-used"`` or ``"random"`` (the paper's comparison).
        seed: seed of ``selection="random"``.
        batch_size: sentences per forward while counting.

    Returns:
        The pruned checkpoint dict and the usage counts ``{layer: [E]}`` it was chosen by.

    Raises:
        SurgeryError: on a bad ``keep``, ``direction`` or checkpoint, naming the value and the fix.
    """
    from lightning_moe.surgery.usage import translation_module, translation_usage

    checkpoint = load_checkpoint_dict(ckpt)
    layers = moe_layer_names(checkpoint["state_dict"])
    if not layers:
        raise SurgeryError(f"{ckpt} has no MoE layer; pass the checkpoint of an MoE model")
    num_experts = layer_num_experts(checkpoint["state_dict"], layers[0])
    top_k = top_k_of(checkpoint.get("hyper_parameters", {}))
    if not top_k <= keep <= num_experts:
        raise SurgeryError(
            f"--keep {keep} must be between top_k={top_k} and num_experts={num_experts} of {ckpt}; pass "
            f"--keep {max(top_k, num_experts // 2)} to keep half the experts"
        )
    if selection == "random":
        usage = {name: torch.zeros(layer_num_experts(checkpoint["state_dict"], name)) for name in layers}
    else:
        usage = translation_usage(translation_module(checkpoint, str(ckpt)), data, split, direction, batch_size)
    pruned = prune_checkpoint(checkpoint, select_experts(usage, keep, selection, seed))
    pruned["lightning_moe_surgery"][-1].update(
        {
            "selection": selection,
            "data": None if data is None else str(data),
            "split": split,
            "direction": direction,
            "usage": {name: counts.tolist() for name, counts in usage.items()},
        }
    )
    if out is not None:
        save_checkpoint_dict(pruned, out)
    return pruned, usage
