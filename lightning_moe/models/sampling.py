"""Continue prompts with a decoder-only language model and its KV cache (greedy or sampled).

Legend: B batch, T positions, V vocabulary.

Works with any model called as ``model(new_ids_BT, cache=cache) -> logits [B, T, V]`` that has a
``new_cache()`` method: :class:`~lightning_moe.models.GPT` and
:class:`~lightning_moe.models.MoEDecoder`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def generate_tokens(
    model: Any,
    input_ids_BT: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    sync_finished: Callable[[bool], bool] | None = None,
) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to prompts of equal length.

    With expert parallelism every process must run the same number of steps (the MoE layers
    exchange tokens): pass ``sync_finished`` (e.g. ``strategy.reduce_boolean_decision`` with
    ``all=True``) to stop only when every process has finished.

    Args:
        model: the decoder (see the module docstring).
        input_ids_BT: prompts, all of length T (no padding).
        max_new_tokens: tokens to append.
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: sample only among the ``top_k`` most likely tokens.
        eos_id: stop once every row has produced this token (later positions repeat it).
        sync_finished: maps "this process has finished" to the decision shared by all processes.

    Returns:
        ``[B, T + n]`` ids, prompt included, ``n <= max_new_tokens``.
    """
    cache = model.new_cache()
    ids_BT = input_ids_BT
    new_BT = input_ids_BT
    finished_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    for _ in range(max_new_tokens):
        logits_BV = model(new_BT, cache=cache)[:, -1].float()
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
            next_B = torch.multinomial(torch.softmax(logits_BV, -1), 1)[:, 0]
        if eos_id is not None:
            next_B = torch.where(finished_B, torch.full_like(next_B, eos_id), next_B)
            finished_B = finished_B | (next_B == eos_id)
        new_BT = next_B[:, None]
        ids_BT = torch.cat([ids_BT, new_BT], dim=1)
        if eos_id is not None:
            done = bool(finished_B.all())
            if sync_finished is not None:
                done = sync_finished(done)
            if done:
                break
    return ids_BT


__all__ = ["generate_tokens"]
