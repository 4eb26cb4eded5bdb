"""Tests of alignment.data.sampler.StepIndexedSampler: DDP equivalence, epochs, resumption, errors."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from alignment.data.sampler import StepIndexedSampler
from alignment.errors import ConfigError


def _batches(sampler):
    keys = list(sampler)
    size = sampler.batch_size
    return [keys[i : i + size] for i in range(0, len(keys), size)]


@pytest.mark.parametrize("dataset_len, batch_size, world", [(10, 2, 2), (23, 3, 4), (9, 1, 3), (16, 4, 1)])
def test_ranks_together_equal_single_process(dataset_len, batch_size, world):
    """Union over W ranks of global batch g == batch g of one process with batch B*W, across epoch boundaries."""
    per_epoch = dataset_len // (batch_size * world)
    total = 3 * per_epoch + 1  # runs into a fourth epoch
    single = _batches(StepIndexedSampler(dataset_len, batch_size * world, total, seed=7))
    ranks = [_batches(StepIndexedSampler(dataset_len, batch_size, total, world, rank, seed=7)) for rank in range(world)]

    assert len(single) == total
    for g in range(total):
        union = [key for rank in range(world) for key in ranks[rank][g]]
        assert all(len(ranks[rank][g]) == batch_size for rank in range(world))
        assert len(set(union)) == batch_size * world  # ranks never share a sample
        assert set(union) == set(single[g])
        assert {epoch for _, epoch in union} == {g // per_epoch}


def test_follows_the_epoch_permutation_strided():
    sampler = StepIndexedSampler(10, batch_size=2, total_batches=5, num_replicas=2, rank=1, seed=3)
    # 10 // 4 = 2 global batches per epoch; positions 8 and 9 of each epoch are dropped.
    assert sampler.batches_per_epoch == 2
    keys = list(sampler)
    for g in range(5):
        epoch, g_in_epoch = divmod(g, 2)
        permutation = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        expected = [(permutation[g_in_epoch * 4 + 1], epoch), (permutation[g_in_epoch * 4 + 3], epoch)]
        assert keys[2 * g : 2 * g + 2] == expected


def test_each_epoch_uses_distinct_samples():
    sampler = StepIndexedSampler(12, batch_size=5, total_batches=4, seed=0)  # 2 batches per epoch, 2 rows dropped
    keys = list(sampler)
    for epoch in (0, 1):
        indices = [index for index, e in keys if e == epoch]
        assert len(indices) == 10 and len(set(indices)) == 10


@pytest.mark.parametrize("start_batch", [0, 1, 4, 5, 9, 12])
def test_start_batch_resumes_the_same_sequence(start_batch):
    full = list(StepIndexedSampler(11, 2, 12, num_replicas=2, rank=1, seed=5))
    resumed = StepIndexedSampler(11, 2, 12, num_replicas=2, rank=1, seed=5, start_batch=start_batch)
    assert list(resumed) == full[start_batch * 2 :]
    assert len(resumed) == 12 * 2  # the full run length, whatever start_batch


def test_same_arguments_same_order_other_seed_differs():
    assert list(StepIndexedSampler(20, 4, 10, seed=1)) == list(StepIndexedSampler(20, 4, 10, seed=1))
    assert list(StepIndexedSampler(20, 4, 10, seed=1)) != list(StepIndexedSampler(20, 4, 10, seed=2))


def test_len():
    assert len(StepIndexedSampler(100, 8, 7, num_replicas=2, rank=0)) == 56
    assert len(list(StepIndexedSampler(100, 8, 7, num_replicas=2, rank=0))) == 56


def test_dataset_too_small():
    with pytest.raises(ConfigError) as error:
        StepIndexedSampler(5, batch_size=2, total_batches=1, num_replicas=4)
    message = str(error.value)
    assert "dataset.batch_size" in message and "only 5 rows are available" in message


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"batch_size": 0}, "dataset.batch_size"),
        ({"rank": 2, "num_replicas": 2}, "rank"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"total_batches": -1}, "total_batches"),
        ({"start_batch": 11}, "start_batch"),
    ],
)
def test_bad_arguments(kwargs, word):
    arguments = {"dataset_len": 50, "batch_size": 2, "total_batches": 10, **kwargs}
    with pytest.raises(ConfigError, match=word):
        StepIndexedSampler(**arguments)


class _KeyEcho(Dataset):
    def __len__(self):
        return 9

    def __getitem__(self, key):
        index, epoch = key
        return torch.tensor([index, epoch])


def test_dataloader_batches_match_global_batches():
    sampler = StepIndexedSampler(9, batch_size=2, total_batches=7, num_replicas=2, rank=0, seed=0, start_batch=2)
    loader = DataLoader(_KeyEcho(), batch_size=2, sampler=sampler, drop_last=False)
    batches = list(loader)
    assert len(batches) == 5
    for g, batch in zip(range(2, 7), batches):
        assert [tuple(row) for row in batch.tolist()] == sampler.batch_keys(g)
