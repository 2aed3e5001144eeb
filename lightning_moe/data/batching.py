"""Batches that survive distribution and resumption: whole batches per rank, and a loader that remembers where it was.

Legend: W data-parallel ranks (``num_replicas``), r this rank.

A *batch source* (:class:`BatchSource`) decides every batch of an epoch from ``(seed, epoch)`` alone:
:class:`~lightning_moe.data.TemperatureSampler` (temperature sampling with length buckets) and
:class:`ShuffledBatches` (a seeded permutation). :class:`DistributedBatchSampler` deals the epoch's
batches out whole, batch ``i`` to rank ``i mod W`` (each rank the same number), so length buckets
stay intact on any number of devices and the union over ranks is the single-device epoch.
:class:`ResumableDataLoader` counts the batches it has handed out and implements Lightning's
stateful-dataloader protocol (``state_dict`` / ``load_state_dict``): a checkpoint records
``{"epoch", "batches"}`` and a resumed run continues with the next batch of the same epoch.

Lightning leaves the sampler alone: :class:`DistributedBatchSampler` is a ``DistributedSampler``,
so Lightning's ``use_distributed_sampler`` does not wrap it in a shuffling
``DistributedSamplerWrapper`` (which would scatter the buckets across ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

__all__ = [
    "BatchSource",
    "DistributedBatchSampler",
    "ResumableDataLoader",
    "ShuffledBatches",
    "batched_dataset",
    "replicas_of",
]


class BatchSource(Protocol):
    """Every batch of an epoch, a pure function of the source's seed and ``epoch``."""

    def batches(self, epoch: int) -> list[list[Any]]:
        """The dataset keys of each batch of ``epoch``, in training order."""
        ...

    def num_batches(self) -> int:
        """How many batches :meth:`batches` returns (the same every epoch)."""
        ...


class ShuffledBatches:
    """Indices ``0 .. n-1`` in a fresh seeded order each epoch, cut into batches (the last partial one dropped).

    Args:
        num_items: dataset length ``n``.
        batch_size: indices per batch.
        seed: epoch ``e`` uses the permutation of ``seed + e``.
        drop_last: drop a final batch smaller than ``batch_size``.
        shuffle: ``False`` keeps the indices in order (evaluation).

    Raises:
        ValueError: if ``batch_size < 1`` or ``num_items < 0``.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, drop_last: bool = True, shuffle: bool = True
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_items < 0:
            raise ValueError(f"num_items={num_items} must be >= 0")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shuffle = shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        """The index batches of ``epoch``."""
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_items)
        out = [chunk.tolist() for chunk in order.split(self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def num_batches(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def replicas_of(trainer: Any) -> tuple[int, int]:
    """``(num_replicas, rank)`` of the data-parallel layout of ``trainer``'s strategy; ``(1, 0)`` without one."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 1, 0
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


class DistributedBatchSampler(DistributedSampler):
    """Deal the whole batches of a :class:`BatchSource` out to ``num_replicas`` ranks; resumable mid-epoch.

    Batch ``i`` of an epoch goes to rank ``i mod W``; every rank gets ``num_batches // W`` batches
    (with ``W = 1``: all of them), so no rank waits for another at the end of an epoch. The order is
    the source's, deterministic per epoch and seed, and the same on every rank.

    Used as a DataLoader's ``sampler`` with ``batch_size=None`` (each item it yields is one batch of
    keys; see :func:`batched_dataset`). Lightning calls :meth:`set_epoch` every epoch.

    Args:
        source: the batches of each epoch.
        num_replicas: W, data-parallel ranks.
        rank: this rank, in ``[0, W)``.

    Raises:
        ValueError: if ``rank`` is outside ``[0, num_replicas)`` or an epoch has fewer batches than ranks.
    """

    def __init__(self, source: BatchSource, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ wants a dataset and a process group; this sampler needs neither.
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if source.num_batches() < num_replicas:
            raise ValueError(
                f"an epoch has {source.num_batches()} batches but there are {num_replicas} ranks; raise the epoch "
                "size (samples_per_epoch) or lower batch_size so that every rank gets at least one batch"
            )
        self.source = source
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.shuffle = False  # the source decides the order
        self.drop_last = True
        self._start = 0

    @override
    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` on the next iteration."""
        self.epoch = int(epoch)

    def start_at(self, batch: int) -> None:
        """Skip this rank's first ``batch`` batches in the iterations from now on (0: start at the beginning)."""
        self._start = int(batch)

    def rank_batches(self, epoch: int | None = None) -> list[list[Any]]:
        """This rank's batches of ``epoch`` (default: the current one), in order."""
        every = self.source.batches(self.epoch if epoch is None else epoch)
        return every[self.rank :: self.num_replicas][: len(self)]

    @override
    def __iter__(self) -> Iterator[list[Any]]:
        # _start stays until the next start_at: a DataLoader may call iter() twice for one pass.
        return iter(self.rank_batches()[self._start :])

    @override
    def __len__(self) -> int:
        total = self.source.num_batches()
        return total if self.num_replicas == 1 else total // self.num_replicas


class _BatchedDataset(Dataset):
    """``dataset[[k1, k2, ...]]`` is the list of ``dataset[k]``: one fetch per batch for ``batch_size=None``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, keys: Sequence[Any]) -> list[Any]:
        return [self.dataset[k] for k in keys]


def batched_dataset(dataset: Dataset) -> Dataset:
    """Wrap ``dataset`` so that it is indexed by a whole batch of keys (for :class:`DistributedBatchSampler`)."""
    return _BatchedDataset(dataset)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`DistributedBatchSampler` that Lightning can checkpoint and resume mid-epoch.

    It counts the batches it has yielded in the current epoch (after any worker prefetching, so the
    count is what training consumed). ``state_dict()`` returns ``{"epoch", "batches"}``;
    after ``load_state_dict`` the next iteration of that epoch skips those batches, so a resumed run
    sees exactly the batches the uninterrupted run would have seen. Lightning saves and restores the
    state of stateful train dataloaders in its checkpoints by itself.

    Args:
        dataset: keyed by single keys; wrapped with :func:`batched_dataset`.
        sampler: the batch sampler.
        collate_fn: turns the list of examples of one batch into the batch.
        num_workers: worker processes.
        seed: seed of the loader's own generator (worker base seeds), so that creating an iterator does
            not draw from the global torch generator and shift the model's random stream.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: DistributedBatchSampler,
        collate_fn: Callable[[list[Any]], Any],
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batched_dataset(dataset),
            sampler=sampler,
            batch_size=None,
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self._epoch = 0
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: its body runs at the first next(), after Lightning has called set_epoch.
        sampler = self.sampler
        assert isinstance(sampler, DistributedBatchSampler)
        start = 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            start = min(self._resume["batches"], len(sampler))
        self._resume = None
        self._epoch, self._yielded = sampler.epoch, start
        sampler.start_at(start)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": n}``: ``n`` batches of epoch ``e`` were handed out."""
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["batches"]`` batches when the next iteration is of epoch ``state["epoch"]``."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
