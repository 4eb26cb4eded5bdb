"""Focus-N-Fix: DRaFT with a regional constraint that keeps the image outside the problematic region
(docs/methods.md#focus-n-fix-objective).

    Î_0 = sample(θ_0, c, x_T)      the reference model (adapters disabled), no gradient
    M   = mask(Î_0)                 1 = the region to fix (a scorer's heatmap, or the saliency of a score)
    Î   = sample(θ, c, x_T)         the same x_T, gradient through the last K steps (as DRaFT)
    J   = r(Î, c) − β · ‖(1 − M) ⊙ (Î_0 − Î)‖_F        loss = − mean_b J_b               [Eq 2, Alg. 1]

The norm is the Frobenius norm of each image's masked difference over channels and pixels, on images in [0, 1].
``method.mask``: ``heatmap`` (the mask scorer's ``heatmap()``), ``saliency`` (``Σ_c |∂s/∂Î_0|`` of the mask scorer,
or of the weighted reward when ``mask_scorer`` is null) or ``ones`` (M = 1: the penalty vanishes and the loss and
gradients are DRaFT's). The map becomes a binary mask by ``alignment.scorers.masks.MaskPipeline``
(``method.mask_options``). The reference is ``backbone.reference_unet()`` (``method.reference``; with LoRA the same
UNet with its adapters disabled, docs/conventions.md#the-reference-model).

The last step's masks, reference images and tuned images stay on the objective (``last_masks``,
``last_reference``, ``last_images``, detached); ``visuals()`` draws them as ``mask_overlay`` (one row per image of
that batch: the reference image, then the tuned image with its mask tinted red, ``masks.mask_overlay``), which the
sample-grid callback saves as ``samples/mask_overlay_step_XXXXXX.png`` and logs to W&B.
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.errors import ConfigError
from alignment.objectives.base import ObjectiveOutput, PromptBatch
from alignment.objectives.draft import DRaFT, _finite, parse_reward
from alignment.scorers.masks import MASK_SOURCES, build_mask_pipeline, has_heatmap, mask_overlay, problem_masks, \
    regional_penalty

class FocusNFix(DRaFT):
    """Focus-N-Fix (module docstring). Logs ``reward``, ``penalty`` (the mean constraint norm), ``objective`` (J's
    mean), ``mask_fraction`` (the mean share of pixels inside the mask) and ``grad_steps``."""

    needs_reference = True

    def __init__(self, reward: dict[str, float] | str = "-nsfw", beta: float = 0.01, mask: str = "saliency",
                 mask_scorer: str | None = None, mask_options: dict | None = None, grad_steps: int = 2,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, truncation: Any = None,
                 negative_prompt: str = "", checkpointing: bool = True):
        beta = _finite(beta, "method.beta")
        if beta < 0:
            raise ConfigError(f"method.beta must be >= 0, got {beta}")
        if mask not in MASK_SOURCES:
            raise ConfigError(f"method.mask must be one of {', '.join(MASK_SOURCES)}, got {mask!r}")
        if mask_scorer is not None and (not isinstance(mask_scorer, str) or not mask_scorer):
            raise ConfigError(f"method.mask_scorer must be a scorer name or null, got {mask_scorer!r}")
        reward_names = list(parse_reward(reward))
        if mask == "heatmap" and mask_scorer is None:
            if len(reward_names) != 1:
                raise ConfigError("method.mask_scorer: method.mask=heatmap with several reward scorers needs the "
                                  f"name of the one whose heatmap makes the mask (one of {reward_names})")
            mask_scorer = reward_names[0]
        if mask_options is not None and not isinstance(mask_options, dict):
            raise ConfigError(f"method.mask_options must be a mapping, got {mask_options!r}")
        pipeline = build_mask_pipeline(mask_options or {}, mask, "method.mask_options")
        super().__init__(reward=reward, grad_steps=grad_steps, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, truncation=truncation, negative_prompt=negative_prompt,
                         checkpointing=checkpointing)
        self.beta = beta
        self.mask = mask
        self.mask_scorer = mask_scorer if mask != "ones" else None
        self.mask_pipeline = pipeline
        if self.mask_scorer is not None and self.mask_scorer not in self.reward_weights:
            self.scorer_names = (*self.scorer_names, self.mask_scorer)
        self.last_masks = self.last_reference = self.last_images = None

    # ------------------------------------------------------------------------------------------ checks
    def scorer_roles(self) -> list[tuple[str, str, str]]:
        roles = super().scorer_roles()
        if self.mask == "saliency":
            if self.mask_scorer is not None:
                roles.append((self.mask_scorer, "the saliency mask's scorer", "method.mask_scorer"))
            else:  # the reward's own saliency: already differentiable as a reward
                roles += [(name, "the saliency mask's scorer", "method.reward") for name in self.reward_weights]
        return roles

    def check_scorer(self, name: str, scorer) -> None:
        super().check_scorer(name, scorer)
        if self.mask == "heatmap" and name == self.mask_scorer and not has_heatmap(scorer):
            kind = scorer.__name__ if isinstance(scorer, type) else type(scorer).__name__
            raise ConfigError(f"method.mask_scorer: method.mask=heatmap needs a scorer with a heatmap, but "
                              f"{name!r} ({kind}) gives none (use method.mask=saliency, or a heatmap scorer)")

    # ------------------------------------------------------------------------------------------ mask
    def make_masks(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """Binary masks (B, 1, H, W) for reference images (B, 3, H, W); all ones for ``mask: ones``. Saliency without
        a ``mask_scorer`` is that of the weighted reward itself."""
        if self.mask_scorer is not None:
            scorer = self.frozen(self.mask_scorer)
        else:
            scorer = lambda x, p: self.reward(x, p)[0]  # noqa: E731 - the reward's own saliency
        return problem_masks(scorer, images, prompts, self.mask, self.mask_pipeline)

    # ------------------------------------------------------------------------------------------ display
    def visuals(self) -> dict[str, torch.Tensor]:
        """``mask_overlay`` (B, 2, 3, H, W): per image of the last training batch, the reference image and the tuned
        image with the mask (made from the reference) tinted red; nothing before the first step."""
        if self.last_masks is None or self.last_reference is None or self.last_images is None:
            return {}
        reference = self.last_reference.detach().float()
        tuned = mask_overlay(self.last_images.detach().float(), self.last_masks.to(reference.device))
        return {"mask_overlay": torch.stack([reference, tuned], dim=1)}

    # ------------------------------------------------------------------------------------------ loss
    def forward(self, backbone, batch: PromptBatch, seed: int) -> ObjectiveOutput:
        k = self.draw_grad_steps(seed, batch.step)
        latents = self.start_latents(backbone, batch, seed)
        uncond = self.unconditional(backbone, batch)
        with torch.no_grad(), backbone.reference_unet() as reference_unet:
            reference = self.sample(backbone, batch, latents, uncond, 0, unet=reference_unet).images
        masks = self.make_masks(reference, batch.captions)
        result = self.sample(backbone, batch, latents, uncond, k)
        total, parts = self.reward(result.images, batch.captions)
        penalty = regional_penalty(reference, result.images, masks)
        objective = total - self.beta * penalty
        self.last_masks, self.last_reference, self.last_images = masks, reference, result.images.detach()
        logs = self.reward_logs(total, parts, k)
        logs.update({"penalty": penalty.mean().detach(), "objective": objective.mean().detach(),
                     "mask_fraction": masks.float().mean().detach()})
        return ObjectiveOutput(-objective.mean(), logs)
