"""Whole batches per rank and a loader that resumes mid-epoch (lightning_moe.data.batching)."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.data import DistributedBatchSampler, ResumableDataLoader, ShuffledBatches, TemperatureSampler


def _temperature(num_samples: int = 400, batch_size: int = 8) -> TemperatureSampler:
    sizes, weights = [50, 30, 20], [0.5, 0.3, 0.2]
    lengths = [(i * 7919) % 37 + 1 for i in range(sum(sizes))]
    return TemperatureSampler(sizes, weights, num_samples, seed=3, lengths=lengths, batch_size=batch_size,
                              bucket_batches=5)  # fmt: skip


def test_batches_are_the_sampler_stream_cut_into_buckets():
    sampler = _temperature()
    batches = sampler.batches(0)
    assert len(batches) == sampler.num_batches() == 50
    assert [key for batch in batches for key in batch] == list(sampler)  # iterating = the batches in order
    spread = sum(max(sampler._lengths[f] for f, _ in b) - min(sampler._lengths[f] for f, _ in b) for b in batches)
    assert spread / len(batches) < 8  # length-bucketed (lengths span 1..37)
    assert sampler.batches(0) == batches and sampler.batches(1) != batches  # per epoch, deterministic


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_whole_batches_and_the_same_count(world):
    sampler = _temperature(num_samples=404)  # 51 batches (the last partial)
    ranks = [DistributedBatchSampler(sampler, world, r) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    every = sampler.batches(2)
    dealt = [list(s) for s in ranks]
    assert {len(d) for d in dealt} == {len(every) // world} == {len(ranks[0])}
    for r, mine in enumerate(dealt):
        assert mine == every[r::world][: len(every) // world]  # whole buckets, in order
    flat = [key for d in dealt for batch in d for key in batch]
    assert len(flat) == len(set(map(tuple, flat)))  # no draw on two ranks


def test_rank_must_be_in_range_and_every_rank_needs_a_batch():
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, num_replicas=2\)"):
        DistributedBatchSampler(ShuffledBatches(10, 2), 2, 2)
    with pytest.raises(ValueError, match="an epoch has 1 batches but there are 4 ranks"):
        DistributedBatchSampler(ShuffledBatches(10, 8), 4, 0)


def test_shuffled_batches_drop_the_partial_one_and_reshuffle_per_epoch():
    source = ShuffledBatches(10, 3, seed=1)
    assert source.num_batches() == 3 and all(len(b) == 3 for b in source.batches(0))
    assert source.batches(0) == ShuffledBatches(10, 3, seed=1).batches(0) != source.batches(1)
    assert ShuffledBatches(10, 3, shuffle=False, drop_last=False).batches(0)[-1] == [9]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_with_the_next_batch(num_workers):
    def make() -> ResumableDataLoader:
        sampler = DistributedBatchSampler(ShuffledBatches(40, 4, seed=5), 1, 0)
        return ResumableDataLoader(list(range(40)), sampler, collate_fn=torch.tensor, num_workers=num_workers)

    loader = make()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    consumed = [next(it) for _ in range(4)]  # workers may have prefetched more; the state counts what was used
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 4}
    rest = list(it)

    resumed = make()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = list(resumed)
    assert [t.tolist() for t in again] == [t.tolist() for t in rest]
    assert len(consumed) + len(again) == len(resumed) == 10
    resumed.sampler.set_epoch(2)  # the next epoch starts at its beginning
    assert len(list(resumed)) == 10
