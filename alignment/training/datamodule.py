"""Lightning data module over any dataset (pairs or prompts), with a step-indexed order that survives DDP and
resumes."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from alignment.data.sampler import StepIndexedSampler


class AlignmentDataModule(L.LightningDataModule):
    """Serves ``dataset`` (raw pairs, or the latent cache built from them) in a data order that is a pure function of
    (seed, global batch number): the same samples per optimizer step for 1 or N processes, and a resumed run
    continues where the checkpoint left off. Requires ``Trainer(use_distributed_sampler=False)``."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, seed: int = 0, collate_fn=None):
        super().__init__()
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        if collate_fn is None:
            from alignment.data.component import collate_fn as default_collate

            collate_fn = default_collate(dataset)
        self.collate_fn = collate_fn

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        sampler = StepIndexedSampler(
            dataset_len=len(self.dataset), batch_size=self.batch_size,
            total_batches=trainer.max_steps * accumulate, num_replicas=trainer.world_size,
            rank=trainer.global_rank, seed=self.seed,
            # trainer.global_step is already restored from the checkpoint when a resumed run asks for its loader
            start_batch=trainer.global_step * accumulate)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate_fn,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False)
