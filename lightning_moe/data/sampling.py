"""Temperature-based sampling over translation directions and denoising languages.

With ``n_i`` training examples in group ``i`` (a direction such as ``en-de``, or a
language for denoising), the group is drawn with probability
``p_i = n_i^(1/T) / sum_j n_j^(1/T)`` (Arivazhagan et al. 2019; Kim et al. 2021 use
``T = 5``). ``T = 1`` samples in proportion to data size, large ``T`` approaches
uniform, which up-samples low-resource languages. Within a group, examples are
drawn uniformly, with replacement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["TemperatureSampler", "temperature_probabilities"]


def temperature_probabilities(counts: Sequence[int], temperature: float) -> list[float]:
    """Return ``n_i^(1/T) / sum_j n_j^(1/T)`` for each count (groups with ``n_i = 0`` get 0).

    Args:
        counts: Number of examples per group.
        temperature: The temperature ``T > 0``.

    Returns:
        Probabilities summing to 1.

    Raises:
        ValueError: If ``temperature <= 0``, a count is negative, or all counts are 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (1 = proportional, 5 = paper default)")
    if any(c < 0 for c in counts) or not any(c > 0 for c in counts):
        raise ValueError(f"counts={list(counts)} must be non-negative with at least one positive")
    scaled = [c ** (1.0 / temperature) if c > 0 else 0.0 for c in counts]
    total = sum(scaled)
    return [s / total for s in scaled]


class TemperatureSampler(Sampler[tuple[int, int]]):
    """Draw ``num_samples`` examples per epoch from weighted groups, with replacement.

    The dataset is the concatenation of the groups: group ``g`` owns flat indices
    ``offset_g .. offset_g + size_g - 1``. Each draw yields ``(flat_index, seed)``, where
    ``seed`` is a fresh 62-bit integer for any per-example randomness (the denoising
    noise), so the whole stream depends only on ``seed`` and the epoch, not on the
    number of workers or devices. Lightning calls :meth:`set_epoch` each epoch, also
    through its distributed sampler wrapper.
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        weights: Sequence[float],
        num_samples: int,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        bucket_batches: int = 0,
    ) -> None:
        """Create the sampler.

        Args:
            group_sizes: Number of examples in each group (may be 0 where the weight is 0).
            weights: Non-negative sampling weight of each group (normalised here).
            num_samples: Draws per epoch.
            seed: Base seed; epoch ``e`` uses ``seed + e``.
            lengths: Length of every flat example, for length bucketing.
            batch_size: Examples per batch, for length bucketing.
            bucket_batches: With ``lengths``, sort each run of ``bucket_batches * batch_size``
                draws by length, cut it into batches and shuffle the batches, so that a batch
                holds examples of similar length (less padding). 0 keeps the draw order.

        Raises:
            ValueError: On mismatched lengths, a positive weight on an empty group,
                no positive weight, or ``num_samples < 1``.
        """
        if len(group_sizes) != len(weights):
            raise ValueError(f"got {len(group_sizes)} group sizes but {len(weights)} weights; pass one per group")
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        for size, weight in zip(group_sizes, weights, strict=True):
            if weight < 0 or (weight > 0 and size <= 0):
                raise ValueError(
                    f"group of size {size} has weight {weight}; weights must be >= 0 and 0 for empty groups"
                )
        if not any(w > 0 for w in weights):
            raise ValueError(f"weights={list(weights)} has no positive entry")
        self.group_sizes = list(group_sizes)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        offsets = [0]
        for size in self.group_sizes:
            offsets.append(offsets[-1] + size)
        self._offsets = torch.tensor(offsets[:-1], dtype=torch.long)
        self._sizes = torch.tensor(self.group_sizes, dtype=torch.long)
        if lengths is not None and len(lengths) != offsets[-1]:
            raise ValueError(f"got {len(lengths)} lengths for {offsets[-1]} examples; pass one per example")
        self._lengths = None if lengths is None else torch.tensor(list(lengths), dtype=torch.long)
        self.batch_size = int(batch_size)
        self.bucket_batches = int(bucket_batches)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` on the next iteration."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([key for batch in self.batches(self.epoch) for key in batch])

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The draws of ``epoch`` cut into batches of ``batch_size`` (with bucketing: the length buckets).

        Iterating the sampler yields these batches' draws one after another. For several devices,
        :class:`~lightning_moe.data.batching.DistributedBatchSampler` deals these batches out whole.

        Args:
            epoch: the epoch; its draws depend on ``seed + epoch`` only.

        Returns:
            ``(flat_index, seed)`` pairs per batch, in training order; only the last may be smaller
            than ``batch_size`` (without bucketing) or the last of each pool (with it).
        """
        generator = torch.Generator().manual_seed(self.seed + epoch)
        groups = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        uniform = torch.rand(self.num_samples, generator=generator, dtype=torch.float64)
        within = (uniform * self._sizes[groups]).long().clamp_max(self._sizes[groups] - 1)
        flat = self._offsets[groups] + within
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        if self._lengths is not None and self.bucket_batches > 0:
            order = self._bucket_batches(self._lengths[flat], generator)
        else:
            order = list(torch.arange(self.num_samples).split(self.batch_size))
        flat_list, seed_list = flat.tolist(), seeds.tolist()
        return [[(flat_list[i], seed_list[i]) for i in batch.tolist()] for batch in order]

    def num_batches(self) -> int:
        """How many batches :meth:`batches` returns per epoch."""
        if self._lengths is not None and self.bucket_batches > 0:
            pool = self.bucket_batches * self.batch_size
            full, rest = divmod(self.num_samples, pool)
            return full * self.bucket_batches + -(-rest // self.batch_size)
        return -(-self.num_samples // self.batch_size)

    def _bucket_batches(self, lengths: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Batches of draw positions: sorted by length within pools, cut into batches, the batches shuffled."""
        pool = self.bucket_batches * self.batch_size
        batches: list[torch.Tensor] = []
        for start in range(0, len(lengths), pool):
            chunk = lengths[start : start + pool]
            batches.extend((start + torch.argsort(chunk, stable=True)).split(self.batch_size))
        perm = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in perm]

    def __len__(self) -> int:
        return self.num_samples
