"""A tiny, randomly initialised Stable-Diffusion-1.5-shaped backbone that runs offline on 2 CPU cores.

It builds the *same* classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the real CLIP BPE
tokenizer, DDPM/DDIM schedulers with SD's scaled-linear β schedule) from small configs with a fixed seed, so every
code path of the real backbone is exercised by the tests. Nothing is downloaded.
"""

from __future__ import annotations

import torch

from alignment.backbones.clip_vocab import build_clip_tokenizer
from alignment.backbones.stable_diffusion import StableDiffusionBackbone

# SD 1.5's scheduler config (scheduler/scheduler_config.json), minus the sampling-only keys.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1)


def build_tiny_backbone(seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon",
                        unet_channels: tuple[int, ...] = (32, 64), vae_channels: tuple[int, ...] = (32, 64),
                        text_hidden_size: int = 32, text_layers: int = 2, cross_attention_dim: int | None = None,
                        name: str = "tiny", dtype: str = "float32") -> StableDiffusionBackbone:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    cross_attention_dim = cross_attention_dim or text_hidden_size
    # Seed before each component so that each one is identical across processes and runs (DDP ranks, resume).
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", projection_dim=text_hidden_size))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1, norm_num_groups=16,
        sample_size=resolution, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2 ** (len(vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=tuple(unet_channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    noise_scheduler = DDPMScheduler(**SD15_SCHEDULER, prediction_type=prediction_type)
    sample_scheduler = DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)
    return StableDiffusionBackbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler,
                                   resolution=resolution, name=name, source=None, dtype=dtype)
