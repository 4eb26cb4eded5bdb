"""A sampler whose data order depends only on the seed and the global batch number.

With :class:`StepIndexedSampler`, one process with batch size ``B * W`` and ``W`` data-parallel processes with
batch size ``B`` see exactly the same samples at every optimizer step, and a run resumed at step ``s`` continues
with the samples the uninterrupted run would have used at step ``s``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from alignment.errors import ConfigError


class StepIndexedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys, batch after batch, as a pure function of ``seed`` and the batch number.

    Epoch ``e`` orders the dataset by ``torch.randperm(dataset_len, generator=torch.Generator().manual_seed(seed + e))``
    and is cut into ``dataset_len // (batch_size * num_replicas)`` global batches (the incomplete last one is
    dropped). Global batch ``g`` (counted over the whole run; epochs roll over on their own) is batch
    ``g' = g % batches_per_epoch`` of epoch ``e = g // batches_per_epoch`` and covers the permutation positions
    ``[g' * B * W, (g' + 1) * B * W)``, where ``B = batch_size`` and ``W = num_replicas``. Rank ``r`` takes the
    positions ``g' * B * W + r + k * W`` for ``k = 0 .. B - 1`` (strided, like ``DistributedSampler``).

    Use it with ``DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)``; the dataset
    receives the ``(index, epoch)`` tuples as keys (see :class:`~alignment.data.pickapic.PreferencePairs`).

    Args:
        dataset_len: Number of items in the dataset.
        batch_size: Per-process batch size ``B``.
        total_batches: Number of global batches in the whole run (one per optimizer step and gradient
            accumulation micro-step); iteration stops after global batch ``total_batches - 1``.
        num_replicas: Number of data-parallel processes ``W``.
        rank: This process's rank, in ``[0, num_replicas)``.
        seed: Seed of the epoch permutations.
        start_batch: First global batch to yield, e.g. the number of batches already consumed by a resumed run.

    Note:
        ``len(sampler)`` is ``total_batches * batch_size``, the length of the *full* run, even when
        ``start_batch > 0``: the trainer counts the batches consumed before a resume itself, so the loader's length
        stays the same for the original and the resumed run. Iterating yields only
        ``(total_batches - start_batch) * batch_size`` keys.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        total_batches: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_batch: int = 0,
    ):
        if batch_size < 1:
            raise ConfigError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1:
            raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}")
        if total_batches < 0:
            raise ConfigError(f"total_batches must be >= 0, got {total_batches}")
        if not 0 <= start_batch <= total_batches:
            raise ConfigError(f"start_batch must be in [0, total_batches={total_batches}], got {start_batch}")
        global_batch_size = batch_size * num_replicas
        if dataset_len < global_batch_size:
            raise ConfigError(
                f"dataset.batch_size {batch_size} x {num_replicas} process(es) = {global_batch_size} exceeds the "
                f"dataset: only {dataset_len} rows are available"
            )

        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.total_batches = int(total_batches)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.start_batch = int(start_batch)
        self.global_batch_size = global_batch_size
        self.batches_per_epoch = self.dataset_len // global_batch_size

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The dataset order of ``epoch``."""
        return torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))

    def batch_position(self, global_batch: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of ``global_batch``."""
        return divmod(global_batch, self.batches_per_epoch)

    def batch_keys(self, global_batch: int, permutation: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """This rank's ``(index, epoch)`` keys of ``global_batch``."""
        epoch, batch_in_epoch = self.batch_position(global_batch)
        if permutation is None:
            permutation = self.epoch_permutation(epoch)
        start = batch_in_epoch * self.global_batch_size + self.rank
        stop = (batch_in_epoch + 1) * self.global_batch_size
        return [(int(index), epoch) for index in permutation[start : stop : self.num_replicas].tolist()]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        current_epoch, permutation = None, None
        for global_batch in range(self.start_batch, self.total_batches):
            epoch, _ = self.batch_position(global_batch)
            if epoch != current_epoch:
                current_epoch, permutation = epoch, self.epoch_permutation(epoch)
            yield from self.batch_keys(global_batch, permutation)

    def __len__(self) -> int:
        return self.total_batches * self.batch_size
