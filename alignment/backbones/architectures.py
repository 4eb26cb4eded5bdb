"""The real component configs of SD 1.5, SD 2.1 and SDXL, and random-weight backbones built from them.

Used by the tests (scaled-down copies with the same block structure, or the real size on the meta device) and by the
GPU benchmark (real sizes, random weights: no download needed to measure throughput). The values are those of the
published ``config.json`` files of each model's diffusers folder.
"""

from __future__ import annotations

import copy

import torch

SD15 = {
    "unet": dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
                 layers_per_block=2, norm_num_groups=32, sample_size=64),
    "vae": dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    # CLIP ViT-L/14 text tower
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1, prediction_type="epsilon"),
    "resolution": 512,
}

SD21 = {
    "unet": dict(SD15["unet"], attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True, sample_size=96),
    "vae": dict(SD15["vae"], sample_size=768),
    # OpenCLIP ViT-H/14 text tower; diffusers ships it with the last layer removed (23 of 24), so its last hidden
    # state is the penultimate layer SD 2 conditions on.
    "text_encoder": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512),
    "scheduler": dict(SD15["scheduler"], prediction_type="v_prediction"),
    "resolution": 768,
}

SDXL = {
    "unet": dict(act_fn="silu", attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 use_linear_projection=True, in_channels=4, out_channels=4, layers_per_block=2,
                 norm_num_groups=32, sample_size=128),
    "vae": dict(SD15["vae"], sample_size=1024, scaling_factor=0.13025),
    "text_encoder": dict(SD15["text_encoder"]),
    # OpenCLIP ViT-bigG/14 text tower with projection (its pooled output is SDXL's text_embeds)
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280),
    "scheduler": dict(SD15["scheduler"]),
    "resolution": 1024,
}

ARCHITECTURES = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


def scaled_down(arch: dict, width: int = 32, text_width: int = 32, text_layers: int = 2,
                resolution: int = 64) -> dict:
    """The same block structure (block types, per-level transformer depth pattern, addition embedding,
    linear projections, prediction type) with small widths, so the full code path runs on a CPU in seconds."""
    small = copy.deepcopy(arch)
    unet, levels = small["unet"], len(arch["unet"]["block_out_channels"])
    unet["block_out_channels"] = [width * 2 ** min(i, 1) for i in range(levels)]
    unet["norm_num_groups"] = 8
    unet["layers_per_block"] = 1
    unet["attention_head_dim"] = 8 if isinstance(arch["unet"]["attention_head_dim"], int) else [8] * levels
    if "transformer_layers_per_block" in unet:  # keep "deeper at lower resolution", but 1 or 2 layers
        unet["transformer_layers_per_block"] = [min(n, 2) for n in arch["unet"]["transformer_layers_per_block"]]
    vae_levels = 2
    small["vae"].update(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * vae_levels,
                        up_block_types=["UpDecoderBlock2D"] * vae_levels, layers_per_block=1, norm_num_groups=8,
                        sample_size=resolution)
    unet["sample_size"] = resolution // 2 ** (vae_levels - 1)
    text_keys = [k for k in ("text_encoder", "text_encoder_2") if k in small]
    widths = {"text_encoder": text_width, "text_encoder_2": text_width * 2 if len(text_keys) == 2 else text_width}
    for key in text_keys:
        small[key].update(hidden_size=widths[key], intermediate_size=2 * widths[key], num_hidden_layers=text_layers,
                          num_attention_heads=4, projection_dim=widths[key])
    unet["cross_attention_dim"] = sum(widths[k] for k in text_keys)
    if unet.get("addition_embed_type") == "text_time":  # pooled text_embeds (encoder 2) + 6 time ids × 256
        unet["projection_class_embeddings_input_dim"] = widths["text_encoder_2"] + 6 * unet["addition_time_embed_dim"]
    small["resolution"] = resolution
    return small


def build_random_backbone(arch: str | dict = "sd15", scale: str = "small", seed: int = 0, dtype: str = "float32",
                          device: str | torch.device = "cpu", name: str | None = None):
    """A backbone of the given architecture with random weights: ``scale="small"`` (``scaled_down``) or ``"full"``
    (the real sizes; pass ``device="meta"`` to inspect shapes without memory)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from alignment.backbones.clip_vocab import build_clip_tokenizer
    from alignment.backbones.stable_diffusion import StableDiffusionBackbone
    from alignment.backbones.sdxl import StableDiffusionXLBackbone

    arch_name = arch if isinstance(arch, str) else (name or "custom")
    spec = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    spec = scaled_down(spec) if scale == "small" else spec
    tokenizer = build_clip_tokenizer()

    def text_model(cls, cfg: dict, offset: int):
        torch.manual_seed(seed + offset)
        config = CLIPTextConfig(**cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return cls(config)

    with torch.device(device):
        text_encoder = text_model(CLIPTextModel, spec["text_encoder"], 0)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**spec["vae"])
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**spec["unet"])
        text_encoder_2 = (text_model(CLIPTextModelWithProjection, spec["text_encoder_2"], 3)
                          if "text_encoder_2" in spec else None)
    noise_scheduler = DDPMScheduler(**spec["scheduler"])
    sample_scheduler = DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)
    common = dict(resolution=spec["resolution"], name=name or f"{arch_name}-random-{scale}", source=None, dtype=dtype)
    if text_encoder_2 is not None:
        return StableDiffusionXLBackbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler,
                                         tokenizer_2=build_clip_tokenizer(), text_encoder_2=text_encoder_2, **common)
    return StableDiffusionBackbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler, **common)
