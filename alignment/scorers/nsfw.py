"""A differentiable NSFW score from Stable Diffusion's safety checker (CompVis/stable-diffusion-safety-checker).

diffusers' ``StableDiffusionSafetyChecker`` flags an image when, for any of its 17 concept embeddings c_k,
``cos(e, c_k) - w_k + adj > 0``, where e is the projected CLIP ViT-L/14 image embedding, w_k the stored
per-concept threshold (``concept_embeds_weights``), and ``adj = 0.01`` when any of the 3 "special care" concepts
fires (``cos(e, s_j) - v_j > 0``), else 0 (diffusers' ``forward_onnx``; its numpy ``forward`` does the same with
scores rounded to 3 decimals). This scorer returns the margin

    score = max_k (cos(e, c_k) - w_k) + adj          (> 0 means the checker flags the image)

computed with torch ops from the pixels, so it can be used as a (negative) reward or for gradient saliency. The
special-care adjustment is a step function (no gradient), as in diffusers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from alignment.scorers.base import Scorer, clip_preprocess
from alignment.dtypes import parse_dtype
from alignment.scorers.clip_scorers import load_pretrained

SPECIAL_CARE_ADJUSTMENT = 0.01


class SafetyCheckerNSFW(Scorer):
    """``model``: hub id / folder of a ``StableDiffusionSafetyChecker``, or the object itself (tests build one from
    a tiny ``CLIPConfig``). ``special_care``: add diffusers' 0.01 adjustment when a special-care concept fires."""

    name = "nsfw"
    differentiable = True
    weight_keys = ("model",)

    def __init__(self, model="CompVis/stable-diffusion-safety-checker", dtype="float32",
                 local_files_only: bool = False, special_care: bool = True, name: str | None = None):
        super().__init__()
        if name:
            self.name = name
        key = f"scorers.{self.name}"
        torch_dtype = parse_dtype(dtype, f"{key}.dtype")
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = load_pretrained(StableDiffusionSafetyChecker, model, f"{key}.model", local_files_only,
                                  dtype=torch_dtype)
        self.checker = checker.to(torch_dtype)
        self.special_care = bool(special_care)
        self.freeze()

    @property
    def image_size(self) -> int:
        size = self.checker.config.vision_config.image_size
        return size if isinstance(size, int) else int(size[0])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings (B, D) (not normalised), as the checker computes them."""
        pixels = clip_preprocess(images.to(self.device), size=self.image_size).to(self.dtype)
        pooled_output = self.checker.vision_model(pixel_values=pixels).pooler_output
        return self.checker.visual_projection(pooled_output)

    def concept_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 17) ``cos - w`` for the NSFW concepts and (B, 3) for the special-care concepts, float32."""
        emb = F.normalize(self.image_embeds(images).float(), dim=-1)
        concepts = F.normalize(self.checker.concept_embeds.float(), dim=-1)
        special = F.normalize(self.checker.special_care_embeds.float(), dim=-1)
        concept = emb @ concepts.t() - self.checker.concept_embeds_weights.float()
        special_scores = emb @ special.t() - self.checker.special_care_embeds_weights.float()
        return concept, special_scores

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        concept, special = self.concept_scores(images)
        score = concept.max(dim=-1).values
        if self.special_care:
            score = score + SPECIAL_CARE_ADJUSTMENT * (special > 0).any(dim=-1).to(score.dtype)
        return score

    @torch.no_grad()
    def flagged(self, images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B,) bool: whether the safety checker would black out each image."""
        n = len(images) if not isinstance(images, torch.Tensor) else images.shape[0]
        return self.score(images, list(prompts) if prompts is not None else [""] * n) > 0
