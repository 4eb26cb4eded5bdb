"""Sampling with classifier-free guidance, one seed per image (shared by generate, validation grids, evaluation).

Each image's initial latent comes from its own ``torch.Generator(seed)`` on the CPU, so the same seed gives the same
starting noise for every model being compared, on any device.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_images(backbone, prompts: list[str], seeds: list[int], num_inference_steps: int = 30,
                  guidance_scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "",
                  scheduler=None) -> torch.Tensor:
    """Generate one image per (prompt, seed); returns float pixels in [0, 1], shape (N, 3, H, W).

    DDIM by default (a fresh copy of the backbone's sampling scheduler, so concurrent calls never share state).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    scheduler = scheduler or DDIMScheduler.from_config(backbone.sample_scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=backbone.device)
    device, dtype = backbone.device, backbone.unet.dtype
    cond = backbone.encode_prompt(list(prompts))
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        uncond = backbone.negative_conditioning(len(prompts), negative_prompt)
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    latents = initial_latents(seeds, backbone.latent_shape).to(device, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = backbone.unet_forward(model_in, t.expand(model_in.shape[0]).to(device), cond)
        if use_cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
        latents = scheduler.step(pred, t, latents, eta=eta).prev_sample
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
