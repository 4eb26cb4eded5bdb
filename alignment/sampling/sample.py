"""Sampling with classifier-free guidance, one seed per image (shared by generate, validation grids, evaluation).

Each image's initial latent comes from its own ``torch.Generator(seed)`` on the CPU, so the same seed gives the same
starting noise for every model being compared, on any device. The sampler is chosen by name (``SAMPLERS``:
``ddim``, the default, or ``dpmsolver``, DPMSolverMultistep as HG-DPO samples) and built fresh for every call by
``make_sampler`` (docs/sampling.md#the-sampler).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch.utils.checkpoint import checkpoint

from alignment.errors import ConfigError

SAMPLERS: tuple[str, ...] = ("ddim", "dpmsolver")
# DPMSolverMultistep as diffusers sets it up for Stable Diffusion (its defaults, fixed here whatever the backbone's
# scheduler config holds): second-order multistep DPM-Solver++ on the data prediction.
DPMSOLVER_OPTIONS = {"algorithm_type": "dpmsolver++", "solver_order": 2}


def check_sampler(name, key: str = "sampler") -> str:
    """``name`` if it is a known sampler, else a one-line ConfigError naming ``key`` (no model needed)."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ConfigError(f"{key} must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return name


def make_sampler(backbone, name: str = "ddim", key: str = "sampler"):
    """A new scheduler ``name`` built ``from_config`` of the backbone's sampling scheduler (its β schedule and
    prediction type). A new instance per sampling call: DPMSolverMultistep keeps the model outputs of earlier steps,
    so a shared instance would carry state from one batch into the next."""
    name = check_sampler(name, key)
    if name == "ddim":
        return DDIMScheduler.from_config(backbone.sample_scheduler.config)
    return DPMSolverMultistepScheduler.from_config(backbone.sample_scheduler.config, **DPMSOLVER_OPTIONS)


def sampler_identity(name: str, eta: float = 0.0) -> dict:
    """What defines the sampler ``name`` in a cache key (evaluation images, sample pools). DDIM's is the key the
    image cache has always used, so DDIM images cached before the sampler choice existed are still reused."""
    if check_sampler(name) == "ddim":
        return {"scheduler": "ddim", "eta": float(eta)}
    return {"scheduler": "dpmsolver", **DPMSOLVER_OPTIONS}


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def seed_latents(backbone, seeds: list[int]) -> torch.Tensor:
    """Unscaled start noise for ``seeds`` on the backbone's device and UNet dtype; one seed gives the same start for
    every sampler (``sample_images`` and ``alignment.sampling.grad.sample_with_grad``) and every model compared."""
    return initial_latents(seeds, backbone.latent_shape).to(backbone.device, backbone.unet.dtype)


def guidance_conditioning(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
                          guidance_scale: float) -> dict[str, torch.Tensor]:
    """The conditioning of one guided UNet call: ``uncond‖cond`` along the batch with CFG, ``cond`` alone without
    (``guidance_scale == 1``), so the guided pair runs as one batched call (docs/sampling.md)."""
    if guidance_scale == 1.0:
        return cond
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def guided_prediction(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                      guidance_scale: float, unet=None) -> torch.Tensor:
    """The model output at step ``t`` with classifier-free guidance: ``ε_u + s · (ε_c − ε_u)``.

    ``cond`` comes from ``guidance_conditioning`` (already ``uncond‖cond`` with CFG); ``unet`` defaults to the policy.
    Pure function of its inputs (no scheduler state is changed), so it can be recomputed by activation checkpointing.
    """
    use_cfg = guidance_scale != 1.0
    model_in = torch.cat([latents, latents]) if use_cfg else latents
    model_in = scheduler.scale_model_input(model_in, t)
    pred = backbone.unet_forward(model_in, t.expand(model_in.shape[0]).to(backbone.device), cond, unet=unet)
    if use_cfg:
        pred_uncond, pred_text = pred.chunk(2)
        pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
    return pred


def guided_step(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                guidance_scale: float, eta: float = 0.0, unet=None, checkpointing: bool = False):
    """One denoising step: the guided prediction, then ``scheduler.step``; returns the scheduler's output
    (``prev_sample``, and ``pred_original_sample`` for DDIM). Shared by ``sample_images`` and the gradient sampler.
    ``eta`` is DDIM's; a scheduler without one (DPMSolverMultistep) takes ``eta=0`` only (else a ValueError).

    ``checkpointing=True`` wraps the UNet call (the whole CFG pair) in non-reentrant activation checkpointing when
    autograd is recording, so its activations are recomputed in the backward pass instead of kept (docs/sampling.md).
    """
    if checkpointing and torch.is_grad_enabled():
        pred = checkpoint(guided_prediction, backbone, scheduler, latents, t, cond, guidance_scale, unet,
                          use_reentrant=False)
    else:
        pred = guided_prediction(backbone, scheduler, latents, t, cond, guidance_scale, unet)
    return scheduler.step(pred, t, latents, **step_options(scheduler, eta))


@functools.lru_cache(maxsize=None)
def _takes_eta(scheduler_class) -> bool:
    # once per scheduler class, not per sampling step (inspect.signature is slow next to a tiny UNet call)
    return "eta" in inspect.signature(scheduler_class.step).parameters


def step_options(scheduler, eta: float) -> dict:
    """``scheduler.step``'s keyword arguments for ``eta``: ``{"eta": eta}`` for DDIM, none for a scheduler without
    eta (a ValueError if ``eta`` is not 0 there: it would be silently ignored)."""
    if _takes_eta(type(scheduler)):
        return {"eta": eta}
    if eta:
        raise ValueError(f"eta={eta}: eta is a DDIM setting, {type(scheduler).__name__} has none (use eta=0)")
    return {}


def predicted_clean(prediction_type: str, noisy: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor,
                    what: str = "this sampler") -> torch.Tensor:
    """``x̂_0`` (float32) from ``x_t`` and the model's output at a timestep whose ``ᾱ_t`` is ``alpha_bar`` (a scalar or
    broadcastable per sample): ``(x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)`` for an ε model, ``sqrt(ᾱ_t) x_t −
    sqrt(1 − ᾱ_t) v`` for a v model; any other ``prediction_type`` is a ConfigError naming ``what`` needs it.
    Shared by reward guidance (``alignment.sampling.reward_guidance``) and HG-DPO's statistic loss."""
    noisy, prediction, alpha_bar = noisy.float(), prediction.float(), alpha_bar.float()
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    raise ConfigError(f"backbone scheduler prediction_type {prediction_type!r} is not supported by {what} (epsilon "
                      "or v_prediction)")


@dataclass
class SamplingStart:
    """What a sampling loop starts from (``start_sampling``): the scheduler with its timesteps set, the conditioning
    of one batched UNet call per step, the scaled start latents and ``scheduler.step``'s keyword arguments."""

    scheduler: object
    cond: dict[str, torch.Tensor]
    latents: torch.Tensor
    step_options: dict


def start_sampling(backbone, prompts: list[str], seeds: list[int], num_inference_steps: int,
                   guidance_scale: float, eta: float = 0.0, negative_prompt: str = "", scheduler=None,
                   conditioner=None, extras: dict | None = None, sampler: str = "ddim", safety=None) -> SamplingStart:
    """The common start of every no-gradient sampling loop (``sample_images``, with or without Safe Latent Diffusion,
    and reward guidance's ``sample_with_reward_guidance``): the sampler (``scheduler`` or a fresh ``sampler``), its
    timesteps, the prompt conditioning batched with the negative prompt's for CFG (``guidance_scale != 1``) and with
    the safety concept's for SLD (``uncond‖prompt‖concept``), and ``seed_latents(seeds) · init_noise_sigma``. A bad
    ``eta`` or SLD without CFG fails here, before any UNet call."""
    from alignment.conditioning import condition, negative_condition

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if safety is not None:
        from alignment.sampling.sld import check_guidance

        check_guidance(safety, guidance_scale)
    scheduler = scheduler or make_sampler(backbone, sampler)
    options = step_options(scheduler, eta)
    scheduler.set_timesteps(num_inference_steps, device=backbone.device)  # also resets a multistep solver's state
    cond = condition(backbone, list(prompts), extras, conditioner)
    uncond = negative_condition(backbone, len(prompts), negative_prompt, conditioner, extras) \
        if guidance_scale != 1.0 else None
    if safety is not None:
        from alignment.sampling.sld import safety_conditioning

        concept = safety_conditioning(backbone, safety, len(seeds), conditioner, extras)
        cond = {k: torch.cat([uncond[k], cond[k], concept[k]]) for k in cond}
    else:
        cond = guidance_conditioning(cond, uncond, guidance_scale)
    latents = seed_latents(backbone, seeds) * scheduler.init_noise_sigma
    return SamplingStart(scheduler, cond, latents, options)


@torch.no_grad()
def sample_images(backbone, prompts: list[str], seeds: list[int], num_inference_steps: int = 30,
                  guidance_scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "",
                  scheduler=None, unet=None, conditioner=None, extras: dict | None = None,
                  sampler: str = "ddim", safety=None) -> torch.Tensor:
    """Generate one image per (prompt, seed); returns float pixels in [0, 1], shape (N, 3, H, W).

    ``sampler`` (``ddim`` or ``dpmsolver``) is built fresh for this call by ``make_sampler``, so calls never share
    scheduler state; ``scheduler`` (an instance) replaces it. ``eta`` is DDIM's and must be 0 with DPMSolver.
    ``unet`` defaults to the policy UNet (e.g. pass the one ``backbone.reference_unet()`` yields). ``conditioner``
    (a method's ``alignment.conditioning.Conditioner``) turns the prompts and their ``extras`` (name -> one value
    per prompt) into the UNet conditioning; without one, the backbone's text encoder alone conditions.
    ``safety`` (an ``alignment.sampling.sld.SafetyGuidance``; None: off) adds Safe Latent Diffusion's negative
    guidance away from its concept (a third UNet branch; needs ``guidance_scale > 1``).
    """
    start = start_sampling(backbone, prompts, seeds, num_inference_steps, guidance_scale, eta, negative_prompt,
                           scheduler, conditioner, extras, sampler, safety)
    scheduler, cond, latents = start.scheduler, start.cond, start.latents
    if safety is not None:
        from alignment.sampling.sld import safe_step

        momentum = None
        for i, t in enumerate(scheduler.timesteps):
            out, momentum = safe_step(backbone, scheduler, latents, t, cond, guidance_scale, safety, momentum, i,
                                      start.step_options, unet=unet)
            latents = out.prev_sample
        return backbone.decode_latents(latents)
    for t in scheduler.timesteps:
        latents = guided_step(backbone, scheduler, latents, t, cond, guidance_scale, eta=eta, unet=unet).prev_sample
    return backbone.decode_latents(latents)


def to_pil(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def image_grid(images: list, columns: int):
    """Paste equally sized PIL images into one grid image, row by row."""
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid
