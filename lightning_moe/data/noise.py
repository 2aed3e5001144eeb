"""Text-infilling noise for the denoising task (BART, Lewis et al. 2020; mBART).

Spans of tokens with Poisson-distributed lengths are cut out of a sentence and each
span is replaced by a single ``<mask>`` token; the model reconstructs the original.
A span of length 0 inserts a ``<mask>`` without removing anything, which teaches the
model that a mask may hide nothing. The number of removed tokens is
``noise_ratio * len(tokens)`` in expectation (fractional counts are rounded up or
down at random), so the measured masking ratio is unbiased even on short sentences.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["masked_token_count", "span_mask"]


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small lambdas used here.
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def span_mask(
    tokens: Sequence[int],
    noise_ratio: float,
    mask_id: int,
    rng: random.Random,
    poisson_lambda: float = 3.0,
) -> list[int]:
    """Corrupt ``tokens`` by text infilling.

    Args:
        tokens: The clean token ids (no special tokens).
        noise_ratio: Expected fraction of ``tokens`` removed, in ``[0, 1]``.
        mask_id: Id of the ``<mask>`` token.
        rng: Source of randomness (the caller seeds it, so results are reproducible).
        poisson_lambda: Mean span length.

    Returns:
        The corrupted ids: unmasked tokens in order, one ``mask_id`` per span.

    Raises:
        ValueError: If ``noise_ratio`` is outside ``[0, 1]`` or ``poisson_lambda`` is not positive.
    """
    if not 0.0 <= noise_ratio <= 1.0:
        raise ValueError(f"noise_ratio={noise_ratio} must be in [0, 1], e.g. 0.35")
    if poisson_lambda <= 0:
        raise ValueError(f"poisson_lambda={poisson_lambda} must be positive, e.g. 3.0")
    n = len(tokens)
    expected = n * noise_ratio
    num_masked = int(expected) + (rng.random() < expected - int(expected))
    if n == 0 or num_masked == 0:
        return list(tokens)

    # Span lengths that sum to exactly num_masked (the last one is cut short).
    lengths: list[int] = []
    remaining = num_masked
    while remaining > 0:
        length = min(_poisson(rng, poisson_lambda), remaining)
        lengths.append(length)
        remaining -= length

    # Spans must be separated by at least one kept token; merge spans until they fit.
    kept = n - num_masked
    while len(lengths) > 1 and len(lengths) - 1 > kept:
        last = lengths.pop()
        lengths[-1] += last
    rng.shuffle(lengths)

    # Distribute the kept tokens over the len(lengths) + 1 gaps (inner gaps >= 1): stars and bars.
    num_spans = len(lengths)
    slack = kept - (num_spans - 1)
    cuts = sorted(rng.sample(range(slack + num_spans), num_spans))
    # Gap i is the number of stars between bars i-1 and i, plus the one mandatory kept token.
    gaps = [cuts[0]] + [cuts[i] - cuts[i - 1] for i in range(1, num_spans)]
    gaps.append(slack + num_spans - 1 - cuts[-1])

    out: list[int] = []
    position = 0
    for gap, length in zip(gaps, lengths, strict=False):
        out.extend(tokens[position : position + gap])
        position += gap
        out.append(mask_id)
        position += length
    out.extend(tokens[position:])
    return out


def masked_token_count(original_length: int, corrupted: Sequence[int], mask_id: int) -> int:
    """How many original tokens :func:`span_mask` removed: the original length minus the kept tokens."""
    return original_length - sum(1 for token in corrupted if token != mask_id)
