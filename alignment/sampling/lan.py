"""Latent adaptive normalisation (LAN, HG-DPO Eq 7; docs/methods.md#latent-adaptive-normalisation-lan): sample the
aligned model and the target model from the same noise, and after every sampler step give the aligned latent the
target latent's per-channel statistics, so the aligned model keeps its content but not a colour shift:

    ĥ = (h − μ(h)) / σ(h) · σ(h_target) + μ(h_target)          per sample, per channel, over H and W

σ is the population standard deviation (``correction=0``), so ``ĥ`` has exactly the target's means and deviations.
Inference only.
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
                    guidance_scale: float = 7.5, negative_prompt: str = "", unet=None, make_scheduler=None
                    ) -> torch.Tensor:
    """Images of the aligned model (``unet``, default the policy) with LAN against ``target_unet`` (e.g. the base
    model: the UNet ``backbone.reference_unet()`` yields with adapters disabled), both from the same start noise;
    returns float pixels in [0, 1]. Each trajectory has its own scheduler (multistep solvers keep state);
    ``make_scheduler()`` builds one (default: DDIM from the backbone's sampling scheduler)."""
    from diffusers import DDIMScheduler

    from alignment.conditioning import condition, negative_condition
    from alignment.sampling.sample import guidance_conditioning, guided_step, seed_latents

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    make_scheduler = make_scheduler or (lambda: DDIMScheduler.from_config(backbone.sample_scheduler.config))
    policy_scheduler, target_scheduler = make_scheduler(), make_scheduler()
    for scheduler in (policy_scheduler, target_scheduler):
        scheduler.set_timesteps(num_inference_steps, device=backbone.device)
    cond = condition(backbone, list(prompts), None, None)
    uncond = negative_condition(backbone, len(prompts), negative_prompt, None, None) if guidance_scale != 1.0 else None
    cond = guidance_conditioning(cond, uncond, guidance_scale)
    start = seed_latents(backbone, seeds) * policy_scheduler.init_noise_sigma
    policy, target = start.clone(), start.clone()
    for t in policy_scheduler.timesteps:
        target = guided_step(backbone, target_scheduler, target, t, cond, guidance_scale, unet=target_unet).prev_sample
        policy = guided_step(backbone, policy_scheduler, policy, t, cond, guidance_scale, unet=unet).prev_sample
        policy = lan_normalise(policy, target)
    return backbone.decode_latents(policy)
