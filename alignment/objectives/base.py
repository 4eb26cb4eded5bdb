"""The contract between the generic training module and a swappable loss component.

An objective receives a ``PairBatch`` (latents, conditioning and dataset row indices; everything already encoded)
and the backbone, and returns the loss and the scalars to log. It never builds models, reads files or logs
images: the LightningModule and its callbacks do that. An objective that trains parameters of its own (e.g. a
value encoder) registers them as submodules in ``setup`` and lists them in ``trainable_parameters``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PairBatch:
    latents_w: torch.Tensor                      # (B, C, h, w) preferred image latents, scaled
    latents_l: torch.Tensor | None               # (B, C, h, w) dispreferred latents; None for prompt-only data
    cond: dict[str, torch.Tensor]                # conditioning of the captions, batch first
    index: torch.Tensor                          # (B,) dataset row of each pair: keys its noise (SPEC §0)
    step: int                                    # optimizer step, also keys the noise
    captions: list[str] = field(default_factory=list)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def sample_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed from (run seed, step, dataset row, stream), identical in every process (SPEC §0)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_timesteps_and_noise(seed: int, step: int, index: torch.Tensor, shape: tuple[int, ...],
                             num_train_timesteps: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``t ~ U{0..T-1}`` and ``ε ~ N(0, I)`` from a generator seeded by (seed, step, row, stream).

    Drawing on the CPU per sample makes the noise independent of batch layout, device and process count, so one
    process and N DDP processes with the same global batch compute the same loss, and a resumed run repeats the
    uninterrupted one.
    """
    timesteps, noises = [], []
    for row in index.tolist():
        gen = torch.Generator().manual_seed(sample_seed(seed, step, int(row), stream))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
        noises.append(torch.randn(shape, generator=gen))
    return torch.cat(timesteps), torch.stack(noises)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L = mean over (C,H,W) of (pred − target)²`` per sample — a mean, not a sum (SPEC §0)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def denoising_error(backbone, latents: torch.Tensor, cond: dict[str, torch.Tensor], timesteps: torch.Tensor,
                    noise: torch.Tensor, unet: nn.Module | None = None) -> torch.Tensor:
    """Per-sample denoising error of ``unet`` (default: the policy) at the given noise and timesteps."""
    noisy = backbone.add_noise(latents, noise, timesteps)
    target = backbone.training_target(latents, noise, timesteps)
    pred = backbone.unet_forward(noisy.to(backbone.unet.dtype), timesteps, cond, unet=unet)
    return per_sample_mse(pred, target)


class Objective(nn.Module):
    """Base class of the loss components (``method.objective`` in the config)."""

    #: whether the data module must provide (w, l) pairs
    needs_pairs: bool = True
    #: whether the method compares against a reference model (LoRA-disabled UNet or a frozen copy)
    needs_reference: bool = True

    def setup(self, backbone) -> None:
        """Called once after the backbone is built and frozen; register any trainable modules here."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective owns and trains besides the backbone's (none by default)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_optimizer_step_end(self, backbone, step: int) -> None:
        """Hook after each optimizer step (e.g. a periodic reference refresh)."""
