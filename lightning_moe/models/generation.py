"""Greedy and beam search for :class:`~lightning_moe.models.EncoderDecoderTransformer`.

Legend: B batch, K beams, S source positions, T target positions, V vocabulary.

Both searches encode once and decode one token per step with a KV cache (``use_cache=False``
re-runs the decoder over the whole prefix each step, the reference the cached path is tested
against). Finished sequences and finished sentences are marked as padding so that they take no
MoE capacity from the live ones.

Outputs are ``[B, T]`` id tensors without the start token, ending with ``eos_id`` where one was
produced, right-padded with ``pad_id``.

With expert parallelism every process must run the same number of decoder steps (the MoE layers
exchange tokens). Pass ``sync_finished`` (e.g. ``strategy.reduce_boolean_decision``) to agree on
when to stop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_moe.models.encoder_decoder import EncoderDecoderTransformer
from lightning_moe.models.transformer import DecoderCache


def _decode_step(
    model: EncoderDecoderTransformer,
    tokens_BT: Tensor,
    pad_BT: Tensor,
    memory: Tensor,
    memory_mask: Tensor | None,
    cache: DecoderCache | None,
) -> Tensor:
    """Log-probabilities of the next token ``[B, V]``, from the cache or by re-running the prefix."""
    if cache is not None:
        logits = model.decode(tokens_BT[:, -1:], memory, memory_mask, pad_BT[:, -1:], cache=cache)
    else:
        logits = model.decode(tokens_BT, memory, memory_mask, pad_BT)
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def _start_tokens(start_id: int | Tensor, B: int, device: torch.device) -> Tensor:
    """``[B, 1]`` decoder start tokens."""
    if isinstance(start_id, Tensor):
        if start_id.shape != (B,):
            raise ValueError(
                f"start_id has shape {tuple(start_id.shape)} but the batch has {B} rows; pass one id or [{B}] ids"
            )
        return start_id.to(device=device, dtype=torch.long)[:, None]
    return torch.full((B, 1), int(start_id), dtype=torch.long, device=device)


@torch.no_grad()
def greedy_search(
    model: EncoderDecoderTransformer,
    src_ids: Tensor,
    *,
    start_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    max_length: int = 128,
    src_padding_mask: Tensor | None = None,
    use_cache: bool = True,
    sync_finished: Callable[[bool], bool] | None = None,
) -> Tensor:
    """Pick the most likely token at every step.

    Args:
        model: the encoder-decoder (put it in eval mode for deterministic output).
        src_ids: ``[B, S]`` source ids.
        start_id: decoder start token: one id for every row, or ``[B]`` ids (for the multilingual
            model, the target-language tag).
        eos_id: end-of-sequence token; a row stops once it produces it.
        pad_id: fills rows that stopped early.
        max_length: most tokens generated per row (EOS included).
        src_padding_mask: ``[B, S]`` True marks source padding; default ``src_ids == pad_id``.
        use_cache: decode incrementally with a KV cache (False re-runs the prefix every step).
        sync_finished: maps "this process has finished" to the decision shared by all processes.

    Returns:
        ``[B, T]`` generated ids, ``T <= max_length``.
    """
    if src_padding_mask is None:
        src_padding_mask = src_ids == pad_id
    B = src_ids.shape[0]
    memory = model.encode(src_ids, src_padding_mask)
    cache = model.new_cache() if use_cache else None
    tokens_BT = _start_tokens(start_id, B, src_ids.device)
    pad_BT = torch.zeros((B, 1), dtype=torch.bool, device=src_ids.device)
    finished_B = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    for _ in range(max_length):
        logprobs_BV = _decode_step(model, tokens_BT, pad_BT, memory, src_padding_mask, cache)
        next_B = logprobs_BV.argmax(dim=-1)
        next_B = torch.where(finished_B, torch.full_like(next_B, pad_id), next_B)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        pad_BT = torch.cat([pad_BT, finished_B[:, None]], dim=1)
        finished_B = finished_B | (next_B == eos_id)
        done = bool(finished_B.all())
        if sync_finished is not None:
            done = sync_finished(done)
        if done:
            break
    return tokens_BT[:, 1:]


@torch.no_grad()
def beam_search(
    model: EncoderDecoderTransformer,
    src_ids: Tensor,
    *,
    start_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    beam_size: int = 4,
    max_length: int = 128,
    length_penalty: float = 1.0,
    src_padding_mask: Tensor | None = None,
    use_cache: bool = True,
    sync_finished: Callable[[bool], bool] | None = None,
) -> Tensor:
    """Beam search with a length penalty (fairseq's scoring).

    A hypothesis's score is its summed log-probability divided by ``length ** length_penalty``
    (``length`` counts generated tokens, EOS included). At each step the ``2K`` best extensions
    are ranked; an EOS among the first ``K`` finishes a hypothesis, and the best ``K`` non-EOS
    extensions stay live. A sentence is done once it has ``K`` finished hypotheses; at
    ``max_length`` the live beams are finished as they are. ``beam_size=1`` is greedy search.

    Args:
        model: the encoder-decoder (put it in eval mode for deterministic output).
        src_ids: ``[B, S]`` source ids.
        start_id: decoder start token: one id for every row, or ``[B]`` ids (for the multilingual
            model, the target-language tag).
        eos_id: end-of-sequence token.
        pad_id: right-pads the returned rows.
        beam_size: K, live hypotheses per sentence.
        max_length: most tokens generated per hypothesis (EOS included).
        length_penalty: exponent of the length normalisation; 0 ranks by raw log-probability,
            larger values favour longer outputs.
        src_padding_mask: ``[B, S]`` True marks source padding; default ``src_ids == pad_id``.
        use_cache: decode incrementally with a KV cache (False re-runs the prefix every step).
        sync_finished: maps "this process has finished" to the decision shared by all processes.

    Returns:
        ``[B, T]`` best hypothesis per sentence, ``T <= max_length``.

    Raises:
        ValueError: if ``beam_size < 1``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1; use 1 for greedy search")
    if src_padding_mask is None:
        src_padding_mask = src_ids == pad_id
    B, K, device = src_ids.shape[0], beam_size, src_ids.device
    memory = model.encode(src_ids, src_padding_mask).repeat_interleave(K, dim=0)
    memory_mask = src_padding_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache() if use_cache else None
    tokens_RT = _start_tokens(start_id, B, device).repeat_interleave(K, dim=0)  # R = B * K rows
    pad_RT = torch.zeros((B * K, 1), dtype=torch.bool, device=device)
    scores_BK = torch.full((B, K), float("-inf"), device=device)
    scores_BK[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    row_offset_B = torch.arange(B, device=device)[:, None] * K

    for step in range(1, max_length + 1):
        logprobs_RV = _decode_step(model, tokens_RT, pad_RT, memory, memory_mask, cache)
        V = logprobs_RV.shape[-1]
        candidates_BKV = scores_BK[:, :, None] + logprobs_RV.view(B, K, V)
        top_scores, top_ids = candidates_BKV.view(B, K * V).topk(min(2 * K, K * V), dim=-1)
        top_beams, top_tokens = (top_ids // V).tolist(), (top_ids % V).tolist()
        top_scores_list = top_scores.tolist()

        next_scores = [[float("-inf")] * K for _ in range(B)]
        next_beams = [list(range(K)) for _ in range(B)]
        next_tokens = [[pad_id] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            live = 0
            candidates = zip(top_scores_list[b], top_beams[b], top_tokens[b], strict=True)
            for rank, (score, beam, token) in enumerate(candidates):
                if score == float("-inf"):
                    break
                if token == eos_id:
                    if rank < K:
                        prefix = tokens_RT[b * K + beam, 1:].tolist()
                        finished[b].append((score / step**length_penalty, [*prefix, eos_id]))
                    continue
                next_scores[b][live], next_beams[b][live], next_tokens[b][live] = score, beam, token
                live += 1
                if live == K:
                    break
            if len(finished[b]) >= K:
                done[b] = True

        rows_R = (row_offset_B + torch.tensor(next_beams, device=device)).view(-1)
        next_R = torch.tensor(next_tokens, device=device).view(-1)
        done_R = torch.tensor(done, device=device).repeat_interleave(K)
        tokens_RT = torch.cat([tokens_RT.index_select(0, rows_R), next_R[:, None]], dim=1)
        pad_RT = torch.cat([pad_RT.index_select(0, rows_R), done_R[:, None]], dim=1)
        scores_BK = torch.tensor(next_scores, device=device)
        if cache is not None:
            cache.reorder(rows_R)

        if step == max_length:
            for b in range(B):
                if not done[b]:
                    for j in range(K):
                        if next_scores[b][j] > float("-inf"):
                            hyp = tokens_RT[b * K + j, 1:].tolist()
                            finished[b].append((next_scores[b][j] / step**length_penalty, hyp))
            break
        all_done = all(done)
        if sync_finished is not None:
            all_done = sync_finished(all_done)
        if all_done:
            break

    best = [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
    out = torch.full((B, max(1, max(len(h) for h in best))), pad_id, dtype=torch.long, device=device)
    for b, hyp in enumerate(best):
        out[b, : len(hyp)] = torch.tensor(hyp, dtype=torch.long, device=device)
    return out


__all__ = ["beam_search", "greedy_search"]
