"""Sampling WITH gradient through the last K denoising steps (DRaFT-K, AlignProp, Focus-N-Fix; docs/sampling.md).

A reward-backpropagation method needs images that are a differentiable function of the trainable weights. Keeping
the graph of all N steps costs memory linear in N, so only the last K steps record it: the first N − K run under
``torch.no_grad()``, the last K with autograd (each guided UNet call optionally checkpointed), then the VAE decode
with autograd. With K = 1 the memory of a step is independent of N.

    cond, uncond = backbone.encode_prompt(prompts), backbone.negative_conditioning(len(prompts))
    out = sample_with_grad(backbone, cond, uncond, seed_latents(backbone, seeds), num_inference_steps=50,
                           grad_steps=1)
    loss = -reward(out.images, prompts).mean(); loss.backward()

The forward values are those of ``sample_images`` for the same seeds and conditioning: both run the same
``guided_step`` (DDIM, η = 0, classifier-free guidance as one batched UNet call over uncond‖cond).

Randomised truncation (AlignProp draws where the gradient starts for every trajectory) is a ``Truncation`` object:
``draw(generator) -> K``, seeded by a ``torch.Generator`` the caller owns, so DDP ranks and resumed runs draw the
same K. A truncation *step* s over N steps (gradient from step s on) is K = N − s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from diffusers import DDIMScheduler
from torch.utils.checkpoint import checkpoint

from alignment.errors import ConfigError
from alignment.sampling.sample import guidance_conditioning, guided_step, seed_latents

__all__ = ["GaussianTruncation", "GradSample", "Truncation", "UniformTruncation", "resolve_grad_steps",
           "sample_with_grad", "seed_latents"]


# ------------------------------------------------------------------------------------------------ truncation
@runtime_checkable
class Truncation(Protocol):
    """Draws K, the number of final denoising steps that keep gradient, for one trajectory (batch)."""

    def draw(self, generator: torch.Generator | None = None) -> int: ...


def _as_int(value) -> int | None:
    """``value`` as an int if it is a whole number (int, numpy integer, integral float), else None (also for bool)."""
    if isinstance(value, bool):
        return None
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return as_int if as_int == value else None


def _check_bounds(low: int, high: int, key: str) -> None:
    if _as_int(low) is None or _as_int(high) is None:
        raise ConfigError(f"{key}.low and {key}.high must be integers, got {low!r} and {high!r}")
    if low < 0 or high < low:
        raise ConfigError(f"{key}: need 0 <= low <= high, got low={low} high={high}")


@dataclass(frozen=True)
class UniformTruncation:
    """K uniform over the integers ``low..high`` (inclusive); TRL's AlignProp redraws it like this."""

    low: int
    high: int
    key: str = "method.truncation"  # the config key named in errors

    def __post_init__(self):
        _check_bounds(self.low, self.high, self.key)

    def draw(self, generator: torch.Generator | None = None) -> int:
        return int(torch.randint(int(self.low), int(self.high) + 1, (1,), generator=generator).item())


@dataclass(frozen=True)
class GaussianTruncation:
    """K = round(mean + std · z), z ~ N(0, 1), clipped to ``low..high`` (inclusive).

    AlignProp's draw of the step where the gradient starts (mean 42, std 5 of 50 steps) is K = 50 − s, i.e.
    ``GaussianTruncation(mean=8, std=5, low=0, high=50)``.
    """

    mean: float
    std: float
    low: int
    high: int
    key: str = "method.truncation"

    def __post_init__(self):
        _check_bounds(self.low, self.high, self.key)
        if not self.std >= 0:  # also rejects NaN
            raise ConfigError(f"{self.key}.std must be >= 0, got {self.std}")

    def draw(self, generator: torch.Generator | None = None) -> int:
        z = torch.randn((1,), generator=generator, dtype=torch.float64).item()
        k = round(float(self.mean) + float(self.std) * z)
        return int(min(max(k, int(self.low)), int(self.high)))


def resolve_grad_steps(num_inference_steps: int, grad_steps: int = 1, truncation: Truncation | None = None,
                       generator: torch.Generator | None = None, key: str = "method.grad_steps") -> int:
    """K for one call: ``truncation.draw(generator)`` when a truncation is given, else ``grad_steps``; checked to lie
    in ``0..num_inference_steps`` (one-line ``ConfigError`` naming the key otherwise)."""
    if _as_int(num_inference_steps) is None or num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if truncation is not None:
        if not isinstance(truncation, Truncation):
            raise ConfigError(f"method.truncation must have a draw(generator) method, got {type(truncation).__name__}")
        k, key = truncation.draw(generator), getattr(truncation, "key", "method.truncation")
        what = "drew"
    else:
        k, what = grad_steps, "got"
    if _as_int(k) is None:
        raise ConfigError(f"{key} must be an integer number of steps, {what} {k!r}")
    k = _as_int(k)
    if not 0 <= k <= num_inference_steps:
        raise ConfigError(f"{key} must be between 0 and num_inference_steps ({num_inference_steps}), {what} {k}")
    return k


# ------------------------------------------------------------------------------------------------ sampler
@dataclass
class GradSample:
    """What ``sample_with_grad`` returns."""

    images: torch.Tensor   # (B, 3, H, W) in [0, 1]; differentiable through the last ``grad_steps`` steps
    latents: torch.Tensor  # the final latents (scaled, as the VAE decodes them)
    grad_steps: int        # K actually used (drawn, with a truncation)
    # DDIM's x0 estimate after every step (the first N − K carry no graph)
    x0_predictions: list[torch.Tensor] = field(default_factory=list)


def sample_with_grad(backbone, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
                     latents: torch.Tensor, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                     grad_steps: int = 1, truncation: Truncation | None = None,
                     generator: torch.Generator | None = None, unet=None, checkpointing: bool = True) -> GradSample:
    """DDIM (η = 0) from ``latents`` with gradient through the last K steps and the VAE decode.

    cond / uncond: flat conditioning dicts as ``backbone.encode_prompt`` returns them (the caller computes them, so a
        method may supply its own); ``uncond`` is needed only with guidance (``guidance_scale != 1``).
    latents: unscaled start noise, batch first (``seed_latents(backbone, seeds)`` gives ``sample_images``' start).
    grad_steps / truncation / generator: K (``resolve_grad_steps``); K = 0 records no graph at all.
    unet: defaults to the policy UNet. With ``backbone.reference_unet()`` (adapters disabled) and checkpointing,
        run the backward inside that context: the recomputation must see the same adapter state.
    checkpointing: recompute each guided UNet call and the VAE decode in the backward pass instead of storing their
        activations (same gradients, much less memory).
    Outside the last K steps nothing is recorded; within them the caller's grad mode applies (under an outer
    ``torch.no_grad()`` nothing is recorded either).
    """
    k = resolve_grad_steps(num_inference_steps, grad_steps, truncation, generator)
    if guidance_scale != 1.0 and uncond is None:
        raise ConfigError(f"guidance_scale={guidance_scale} needs the unconditional conditioning (uncond); "
                          "pass uncond or guidance_scale=1.0")
    for name, part in (("cond", cond), ("uncond", uncond if guidance_scale != 1.0 else None)):
        for key, value in (part or {}).items():
            if value.shape[0] != latents.shape[0]:
                raise ValueError(f"{name}[{key!r}] has batch {value.shape[0]} but latents have {latents.shape[0]}")
    num_inference_steps = _as_int(num_inference_steps)
    scheduler = DDIMScheduler.from_config(backbone.sample_scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=backbone.device)
    model_cond = guidance_conditioning(cond, uncond, guidance_scale)
    latents = latents.to(backbone.device, backbone.unet.dtype) * scheduler.init_noise_sigma
    first_grad_step = num_inference_steps - k
    x0_predictions = []
    for i, t in enumerate(scheduler.timesteps):
        if i < first_grad_step:
            with torch.no_grad():
                out = guided_step(backbone, scheduler, latents, t, model_cond, guidance_scale, eta=0.0, unet=unet)
        else:
            out = guided_step(backbone, scheduler, latents, t, model_cond, guidance_scale, eta=0.0, unet=unet,
                              checkpointing=checkpointing)
        latents = out.prev_sample
        x0_predictions.append(out.pred_original_sample)
    if k == 0:
        with torch.no_grad():
            images = backbone.decode_latents(latents)
    elif checkpointing and torch.is_grad_enabled():
        images = checkpoint(backbone.decode_latents, latents, use_reentrant=False)
    else:
        images = backbone.decode_latents(latents)
    return GradSample(images=images, latents=latents, grad_steps=k, x0_predictions=x0_predictions)
