"""Stable Diffusion XL: two text encoders and micro-conditioning (docs/conventions.md#sdxl).

    encoder_hidden_states = concat(penultimate hidden state of CLIP ViT-L, penultimate of OpenCLIP bigG)  # 768+1280
    text_embeds           = pooled, projected output of encoder 2                                         # 1280
    time_ids              = original_size + crop_top_left + target_size, per sample                         # 6

The UNet receives ``text_embeds`` and ``time_ids`` as ``added_cond_kwargs``; ``StableDiffusionBackbone.unet_forward``
passes every conditioning key other than ``encoder_hidden_states`` there, so nothing else changes for SDXL.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.backbones.stable_diffusion import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    def __init__(self, tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler, resolution: int,
                 tokenizer_2=None, text_encoder_2=None, name: str = "sdxl", source: str | None = None,
                 dtype: str = "float32", force_zeros_for_empty_prompt: bool = True):
        super().__init__(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler, resolution,
                         name=name, source=source, dtype=dtype)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.requires_grad_(False)
        if next(self.text_encoder_2.parameters()).dtype != self.weight_dtype:
            self.text_encoder_2.to(self.weight_dtype)
        # SDXL base's pipeline uses zeros, not the empty prompt's embedding, as the unconditional branch
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, revision: str | None = None,
                        variant: str | None = None, dtype: str = "float32", resolution: int = 1024,
                        name: str = "sdxl", prediction_type: str | None = None,
                        local_files_only: bool | None = None, vae_model_name_or_path: str | None = None,
                        force_zeros_for_empty_prompt: bool = True) -> "StableDiffusionXLBackbone":
        """SDXL from a hub id or local diffusers folder; ``vae_model_name_or_path`` swaps in another VAE (e.g. the
        fp16-fix VAE ``madebyollin/sdxl-vae-fp16-fix``, which does not overflow in fp16)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        path = cls.resolve_source(str(pretrained_model_name_or_path),
                                  ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                   "scheduler"))
        towers = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        parts = cls.load_components(path, towers, revision, variant, dtype, prediction_type, local_files_only,
                                    vae_model_name_or_path=vae_model_name_or_path)
        return cls(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], parts["noise_scheduler"],
                   parts["sample_scheduler"], resolution=resolution, tokenizer_2=parts["tokenizer_2"],
                   text_encoder_2=parts["text_encoder_2"], name=name, source=path, dtype=dtype,
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    def save_pretrained(self, folder: str | Path) -> Path:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                         text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                         tokenizer_2=self.tokenizer_2, unet=self.unet,
                                         scheduler=self.sample_scheduler,
                                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    # ------------------------------------------------------------------------------------------ conditioning
    def time_ids(self, batch_size: int, original_sizes: torch.Tensor | None = None,
                 crop_top_lefts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 6) ``original (h, w) + crop top-left (y, x) + target (h, w)``; without image metadata the image is
        taken as uncropped at the target size (what the pipelines use at inference)."""
        target = torch.tensor([self.resolution, self.resolution], dtype=torch.float32)
        original = (torch.as_tensor(original_sizes, dtype=torch.float32).reshape(batch_size, 2)
                    if original_sizes is not None else target.expand(batch_size, 2))
        crops = (torch.as_tensor(crop_top_lefts, dtype=torch.float32).reshape(batch_size, 2)
                 if crop_top_lefts is not None else torch.zeros(batch_size, 2))
        ids = torch.cat([original, crops, target.expand(batch_size, 2)], dim=1)
        return ids.to(self.device, self.unet.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer (docs/conventions.md#sdxl)
            if encoder is self.text_encoder_2:
                pooled = out.text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled,
                "time_ids": self.time_ids(len(prompts))}

    def negative_conditioning(self, batch_size: int, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        cond = self.encode_prompt([negative_prompt] * batch_size)
        if self.force_zeros_for_empty_prompt and not negative_prompt:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    def image_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample ``time_ids`` from the data's original size and crop, when the batch carries them."""
        if "original_size" not in batch:
            return {}
        n = len(batch["original_size"])
        return {"time_ids": self.time_ids(n, batch["original_size"], batch.get("crop_top_left"))}
