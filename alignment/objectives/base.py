"""The contract between the generic training module and a swappable loss component (docs/contract.md).

An objective declares what it needs and computes a loss from a batch; it never reads files, builds the backbone or
logs images (the LightningModule and its callbacks do that):

- ``batch_kind``: ``"pairs"`` (a ``PairBatch``: preferred and dispreferred latents) or ``"prompts"`` (a
  ``PromptBatch``: captions only, for methods that sample online, e.g. DRaFT). Checked against the dataset before
  any model loads.
- ``required_extras()``: per-sample dataset columns it reads from ``batch.extras`` (``dataset.extra_columns``).
- ``scorer_names``: ``None`` (no scorers), ``"all"`` or a tuple of names from the ``scorers`` config. The scorers
  are built once, frozen and handed to ``setup``; the objective keeps them (and any other frozen model) with
  ``hold_frozen`` — never trained, never in a checkpoint, moved to the training device and dtype by the module.
- ``needs_reference``: whether it calls ``backbone.reference_unet()`` (the reference strategy, see
  ``alignment.training.reference``).
- ``conditioner``: optionally an ``alignment.conditioning.Conditioner`` that turns prompts (and extras) into UNet
  conditioning; used in training, in the sample grid, and exported with the run.
- ``trainable_parameters()``: what it trains besides the UNet adapter / the UNet (e.g. a value encoder).
- ``on_optimizer_step_end(backbone, step)``: a hook after each optimizer step (e.g. a reference refresh).
- ``visuals()``: images the objective wants shown beside the sample grid (e.g. Focus-N-Fix's mask overlays), as
  ``{name: tensor in [0, 1]}``; the sample-grid callback saves and logs them. Default: none.
- ``pair_labeller()``: optionally an object that relabels a pair dataset from scores computed once by a builder
  and cached beside the data (BalancedDPO's vote; docs/contract.md#pair-labellers). It has ``extras`` (the
  per-sample columns it adds), ``orders_pairs`` (whether ``latents_w`` is then the preferred image), ``resolve(
  available scorer names) -> names``, ``builder(source, split, max_rows, hf_cache_dir)``, ``cache_dir(source)``,
  ``label(table) -> PairLabels`` and ``describe(stats) -> str``; the recipe runs it, the training loop never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from alignment.seeding import derive_seed

BATCH_KINDS = ("pairs", "prompts")
_ACTIVE = ("objective call in progress",)


class _ConditionedBatch:
    def __post_init__(self):
        if self.prompt_cond is None:  # no conditioner: the UNet sees the text encoder's own conditioning
            self.prompt_cond = self.cond


@dataclass
class PairBatch(_ConditionedBatch):
    latents_w: torch.Tensor                      # (B, C, h, w) preferred image latents, scaled
    latents_l: torch.Tensor | None               # (B, C, h, w) dispreferred latents
    cond: dict[str, torch.Tensor]                # conditioning of the captions (after the objective's conditioner)
    index: torch.Tensor                          # (B,) dataset row of each pair: keys its noise
    step: int                                    # optimizer step, also keys the noise
    captions: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)      # dataset.extra_columns, collated
    prompt_cond: dict[str, torch.Tensor] | None = None        # the frozen text encoder's conditioning (no conditioner)
    # Denoising passes computed for this batch, shared by the terms of a composed objective (see ``shared_pass``).
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.latents_w.shape[0])


@dataclass
class PromptBatch(_ConditionedBatch):
    """Prompt-only data: methods that sample images online (DRaFT-K, Focus-N-Fix)."""

    captions: list[str]
    cond: dict[str, torch.Tensor]                # conditioning of the captions (after the objective's conditioner)
    index: torch.Tensor                          # (B,) dataset row of each prompt: keys its noise / start latents
    step: int
    extras: dict[str, Any] = field(default_factory=dict)
    prompt_cond: dict[str, torch.Tensor] | None = None
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.captions)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def shared_pass(batch, key: tuple, compute):
    """``compute()`` once per batch and ``key``: terms of a composed objective that need the same denoising pass
    (same model, latents, timesteps and noise) share one UNet call and its autograd graph."""
    if key not in batch.memo:
        batch.memo[key] = compute()
    return batch.memo[key]


def sample_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """The seed of one sample's draws at one step (docs/conventions.md#reproducible-noise)."""
    return derive_seed(seed, step, index, stream)


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
    """``L = mean over (C,H,W) of (pred − target)²`` per sample — a mean, not a sum
    (docs/conventions.md#the-per-sample-denoising-error)."""
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

    #: "pairs" (PairBatch) or "prompts" (PromptBatch)
    batch_kind: ClassVar[str] = "pairs"
    #: whether the method compares against a reference model (``backbone.reference_unet()``)
    needs_reference: ClassVar[bool] = True
    #: scorers the objective asks for: None, "all", or a tuple of names of the ``scorers`` config
    scorer_names: ClassVar[str | tuple[str, ...] | None] = None

    def __init__(self):
        super().__init__()
        # Frozen helpers are kept outside nn.Module's registry: not in parameters(), state_dict() or checkpoints.
        object.__setattr__(self, "_frozen", {})
        self.conditioner = None

    # ------------------------------------------------------------------------------------------ declarations
    def required_extras(self) -> tuple[str, ...]:
        """Per-sample dataset columns this objective (and its conditioner) read from ``batch.extras``."""
        own = tuple(getattr(self.conditioner, "extras", ()) or ())
        return own

    def wanted_scorers(self, available: list[str]) -> list[str]:
        """The configured scorers this objective needs (names), or [] — checked before any model loads."""
        if self.scorer_names is None:
            return []
        if self.scorer_names == "all":
            return list(available)
        return list(self.scorer_names)

    def check_scorer_classes(self, classes: dict[str, type], resolution: int | None) -> None:
        """Before any model loads (docs/contract.md#frozen-helpers): ``classes`` maps each configured scorer
        this objective asked for (``wanted_scorers``) to the class its ``_target_`` names; an objective refuses one
        that cannot serve it (e.g. a reward that is not differentiable) with a one-line ConfigError. ``resolution``:
        the backbone's. Default: nothing to check."""

    # --------------------------------------------------------------------------------------- frozen helpers
    def setup(self, backbone, scorers: dict | None = None) -> None:
        """Called once after the backbone is built, before training; ``scorers`` holds the frozen scorers asked
        for. The default keeps them as frozen helpers under their names (``self.frozen("name")``)."""
        for name, scorer in (scorers or {}).items():
            self.hold_frozen(name, scorer)
        if self.conditioner is not None:
            self.conditioner.setup(backbone)

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` as a frozen helper: no gradient, eval mode, not registered as a submodule (so never in
        the optimizer or a checkpoint); the training module moves it to the training device and dtype."""
        module.requires_grad_(False)
        module.eval()
        self._frozen[name] = module
        return module

    def frozen(self, name: str) -> nn.Module:
        return self._frozen[name]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return dict(self._frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen.values():  # helpers stay in eval mode (dropout off, fixed norms)
            module.eval()
        return self

    # ------------------------------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective owns and trains besides the backbone's (none by default)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, backbone, batch, seed: int) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, backbone, batch, seed: int) -> ObjectiveOutput:
        # Shared passes live for one evaluation of the outermost objective: its terms share them, a later call on
        # the same batch object (after an optimizer step) computes afresh.
        outermost = not batch.memo.get(_ACTIVE)
        if outermost:
            batch.memo.clear()
            batch.memo[_ACTIVE] = True
        try:
            return super().__call__(backbone, batch, seed)
        finally:
            if outermost:
                batch.memo.clear()

    def on_optimizer_step_end(self, backbone, step: int) -> None:
        """Hook after each optimizer step (e.g. a periodic reference refresh)."""

    def visuals(self) -> dict[str, torch.Tensor]:
        """Images to show beside the sample grid, ``{name: images}`` in [0, 1] (docs/contract.md#objectives): one
        image (3, H, W), a row (N, 3, H, W) or a grid (rows, columns, 3, H, W). Whenever the sample-grid callback
        saves its grid it saves each as ``samples/<name>_step_XXXXXX.png`` and logs it to the image loggers (W&B)
        under ``<name>``. Names: letters, digits, ``_ . -``. Typically drawn from the last training step; the
        default shows nothing."""
        return {}

    def pair_labeller(self):
        """The object that relabels pair data before training (see the module docstring), or None."""
        return None
