"""Latent adaptive normalisation (LAN, HG-DPO Eq 7; docs/methods.md#latent-adaptive-normalisation-lan): sample the
aligned model and the target model from the same noise, and after every sampler step give the aligned latent the
target latent's per-channel statistics, so the aligned model keeps its content but not a colour shift:

    ĥ = (h − μ(h)) / σ(h) · σ(h_target) + μ(h_target)          per sample, per channel, over H and W

σ is the population standard deviation (``correction=0``), so ``ĥ`` has exactly the target's means and deviations.
Inference only: ``lan=true`` in ``alignment.generate`` / ``alignment.evaluate`` samples a model this way against the
base model (``alignment.runs.LoadedModel``).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def lan_normalise(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``latents`` (B, C, H, W) with each channel's mean and standard deviation replaced by ``target``'s."""
    mean = latents.mean(dim=(2, 3), keepdim=True)
    std = latents.std(dim=(2, 3), keepdim=True, correction=0)
    target_mean = target.mean(dim=(2, 3), keepdim=True)
    target_std = target.std(dim=(2, 3), keepdim=True, correction=0)
    return (latents - mean) / std.clamp(min=EPS) * target_std + target_mean


@torch.no_grad()
def sample_with_lan(backbone, prompts: list[str], seeds: list[int], target_unet, num_inference_steps: int = 30,
                    guidance_scale: float = 7.5, negative_prompt: str = "", unet=None, conditioner=None,
                    extras: dict | None = None, sampler: str = "ddim") -> torch.Tensor:
    """Images of the aligned model (``unet``, default the policy; ``conditioner`` with its ``extras``, as in
    ``sample_images``) with LAN against the target model, both from the same start noise; returns float pixels in
    [0, 1].

    ``target_unet`` is the target's UNet module (None: the policy itself), or a zero-argument callable returning a
    context manager that yields it — entered around every target call and for its text conditioning, so a target
    that exists only while the policy's adapters are off (``alignment.runs.LoadedModel.target``, or
    ``backbone.reference_unet``) leaves the policy itself for the policy's calls. The target is conditioned by the
    text encoder alone (the base model has no conditioner). Each trajectory has its own ``sampler`` instance
    (``make_sampler``): multistep solvers keep state.
    """
    from contextlib import nullcontext

    from alignment.conditioning import condition, negative_condition
    from alignment.sampling.sample import guidance_conditioning, guided_step, make_sampler, seed_latents

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if target_unet is None or isinstance(target_unet, torch.nn.Module):
        fixed = target_unet
        target_context = lambda: nullcontext(fixed)  # noqa: E731
    else:
        target_context = target_unet
    policy_scheduler, target_scheduler = make_sampler(backbone, sampler), make_sampler(backbone, sampler)
    for scheduler in (policy_scheduler, target_scheduler):
        scheduler.set_timesteps(num_inference_steps, device=backbone.device)

    def conditioning(conditioner, extras):
        cond = condition(backbone, list(prompts), extras, conditioner)
        uncond = negative_condition(backbone, len(prompts), negative_prompt, conditioner, extras) \
            if guidance_scale != 1.0 else None
        return guidance_conditioning(cond, uncond, guidance_scale)

    policy_cond = conditioning(conditioner, extras)
    with target_context():
        target_cond = conditioning(None, None)
    start = seed_latents(backbone, seeds) * policy_scheduler.init_noise_sigma
    policy, target = start.clone(), start.clone()
    for t in policy_scheduler.timesteps:
        with target_context() as target_module:
            target = guided_step(backbone, target_scheduler, target, t, target_cond, guidance_scale,
                                 unet=target_module).prev_sample
        policy = guided_step(backbone, policy_scheduler, policy, t, policy_cond, guidance_scale, unet=unet).prev_sample
        policy = lan_normalise(policy, target)
    return backbone.decode_latents(policy)
