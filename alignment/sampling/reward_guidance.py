"""Reward guidance at sampling time: Focus-N-Fix's baseline [Eq 3] (docs/methods.md#reward-guidance-baseline).

At every denoising step the (classifier-free guided) noise prediction is pushed toward a higher reward:

    x̂_0(x_t) = ( x_t − sqrt(1 − ᾱ_t) · ε_θ(x_t) ) / sqrt(ᾱ_t)                 the model's clean-latent estimate
    g        = ∇_{x_t} r( decode(x̂_0(x_t)) )                                 autograd, per image
    g        ← clip( g ⊙ M )                                                 M: the mask at latent resolution
    ε̂        = ε_θ(x_t) − λ · sqrt(1 − ᾱ_t) · g                              then the scheduler's step with ε̂

The minus sign makes the reward go *up* (the paper's form, after Universal Guidance, has the gradient of a loss).
``γ_t`` of the paper is read as ``ᾱ_t`` (the scheduler's ``alphas_cumprod`` at ``t``) and ``r`` is evaluated on the
VAE decode of ``x̂_0`` in [0, 1] **[choices, docs/methods.md#reward-guidance-baseline]**. ``grad_through_unet``: true
(the default, as Universal Guidance) differentiates ``ε_θ(x_t)`` too; false holds ε constant, so
``g = ∇_{x̂_0} r / sqrt(ᾱ_t)`` (no backward pass through the UNet: cheaper). The clip bounds the L2 norm of each
image's masked gradient (over its latent channels and pixels) by ``clip`` (null: no clipping), so that
``‖ε̂ − ε‖ ≤ λ · sqrt(1 − ᾱ_t) · clip`` at every step. A v-prediction backbone gets the same change expressed on v
(``v̂ = v − λ · sqrt(1 − ᾱ_t) / sqrt(ᾱ_t) · g``, ``x̂_0 = sqrt(ᾱ_t) x_t − sqrt(1 − ᾱ_t) v``); a sample-prediction
backbone is refused. λ = 0 is plain sampling: no reward is evaluated and the images are ``sample_images``' own.

``RewardGuidance`` is the ``reward_guidance`` node of ``python -m alignment.generate``: the reward (a scorer name or a
weighted sum, as ``method.reward``), λ (``scale``), ``clip``, the mask (null: M = 1; ``heatmap`` / ``saliency``: made
by the mask pipeline of Focus-N-Fix, ``alignment.scorers.masks``, from the *unguided* image of the same seed; or the
path of a mask image / folder as evaluate's ``metrics.change.mask``). Every setting is checked from the config alone,
before any model loads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from alignment.errors import ConfigError

KEY = "reward_guidance"
MASK_KINDS = ("heatmap", "saliency")  # masks made from the unguided image; anything else non-null is a path
OPTIONS = ("scorer", "scale", "clip", "mask", "mask_scorer", "mask_options", "grad_through_unet")


# ------------------------------------------------------------------------------------------------ the sampler
def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel-space masks (B, 1, H, W) or (B, H, W) in [0, 1] -> (B, 1, h, w) at latent resolution by area averaging
    (a latent pixel's weight is the share of its image patch inside the mask); broadcasts over latent channels."""
    if masks.ndim == 3:
        masks = masks[:, None]
    return F.adaptive_avg_pool2d(masks.float(), size)


def clip_per_sample(grad: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Each sample's gradient scaled down so that its L2 norm (over all its other dimensions) is at most
    ``max_norm``; unchanged when within it or when ``max_norm`` is None."""
    if max_norm is None:
        return grad
    norms = torch.linalg.vector_norm(grad.flatten(1).float(), dim=1)
    factor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return grad * factor.view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)


def _prediction_terms(scheduler, t: torch.Tensor, latents: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(prediction type, ᾱ_t) of the scheduler at timestep ``t``, ``ᾱ_t`` in float32 on the latents' device. A
    prediction type other than epsilon / v_prediction is a ConfigError."""
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"{KEY}: the backbone's scheduler predicts {kind!r}; reward guidance needs an epsilon or "
                          "v_prediction model")
    return kind, scheduler.alphas_cumprod.to(latents.device)[int(t)].float()


def reward_gradient(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: dict, guidance_scale: float,
                    reward_fn: Callable, prompts: Sequence[str], unet=None,
                    grad_through_unet: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided model output at ``t`` (detached) and ``g = ∇_{x_t} r(decode(x̂_0(x_t)))`` per image (float32).

    Scores of different images are independent (scorers and the UNet in eval mode), so the gradient of their sum is
    each image's own. With ``grad_through_unet=False`` the model output is computed without gradient and held
    constant. A reward with no graph back to the latents (one that ignores the pixels) gives a zero gradient."""
    from alignment.sampling.sample import guided_prediction, predicted_clean

    kind, alpha_bar = _prediction_terms(scheduler, t, latents)
    x = latents.detach().requires_grad_(True)
    grad = None
    with torch.enable_grad():
        if grad_through_unet:
            pred = guided_prediction(backbone, scheduler, x, t, cond, guidance_scale, unet)
        else:
            with torch.no_grad():
                pred = guided_prediction(backbone, scheduler, latents, t, cond, guidance_scale, unet)
        clean = predicted_clean(kind, x, pred, alpha_bar, "reward guidance")
        images = backbone.decode_latents(clean.to(latents.dtype))
        rewards = reward_fn(images, list(prompts))
        if torch.is_tensor(rewards) and rewards.requires_grad:
            (grad,) = torch.autograd.grad(rewards.float().sum(), x, allow_unused=True)
    if grad is None:  # the reward ignores the pixels (no graph, or none reaching x_t)
        grad = torch.zeros_like(x)
    return pred.detach(), grad.float()


def guided_output(pred: torch.Tensor, grad: torch.Tensor, kind: str, alpha_bar: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """``ε̂ = ε − λ sqrt(1 − ᾱ_t) g`` on an ε model; the same change of ε written on v for a v model
    (``v̂ = v − λ sqrt(1 − ᾱ_t) / sqrt(ᾱ_t) g``). ``grad`` is already masked and clipped."""
    sqrt_a, sqrt_1ma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    coefficient = scale * sqrt_1ma if kind == "epsilon" else scale * sqrt_1ma / sqrt_a
    return (pred.float() - coefficient * grad).to(pred.dtype)


@torch.no_grad()
def sample_with_reward_guidance(backbone, prompts: list[str], seeds: list[int], reward_fn: Callable,
                                scale: float, clip: float | None = None, masks: torch.Tensor | None = None,
                                grad_through_unet: bool = True, num_inference_steps: int = 30,
                                guidance_scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "",
                                scheduler=None, unet=None, conditioner=None, extras: dict | None = None,
                                sampler: str = "ddim") -> torch.Tensor:
    """``sample_images`` with reward guidance (module docstring); pixels in [0, 1], (N, 3, H, W).

    ``reward_fn(images_0_1, prompts) -> (N,)`` is differentiable in the images (e.g. a scorer, or a weighted sum of
    scorers). ``masks``: pixel-space (N, 1, H, W) or (N, H, W) weights in [0, 1] (1 = where the latent may be
    guided), resized to latent resolution by ``latent_mask``; None: M = 1. The other arguments are
    ``sample_images``'; the loop is its own step for step, so ``scale = 0`` gives its images exactly."""
    from alignment.sampling.sample import guided_prediction, start_sampling

    start = start_sampling(backbone, prompts, seeds, num_inference_steps, guidance_scale, eta, negative_prompt,
                           scheduler, conditioner, extras, sampler)
    scheduler, cond, latents, options = start.scheduler, start.cond, start.latents, start.step_options
    weight = None
    if masks is not None:
        if masks.shape[0] != len(prompts):
            raise ValueError(f"{masks.shape[0]} masks for {len(prompts)} images")
        weight = latent_mask(masks.to(latents.device), tuple(latents.shape[-2:]))
    for t in scheduler.timesteps:
        if scale == 0:
            pred = guided_prediction(backbone, scheduler, latents, t, cond, guidance_scale, unet)
        else:
            kind, alpha_bar = _prediction_terms(scheduler, t, latents)
            pred, grad = reward_gradient(backbone, scheduler, latents, t, cond, guidance_scale, reward_fn, prompts,
                                         unet, grad_through_unet)
            if weight is not None:
                grad = grad * weight
            pred = guided_output(pred, clip_per_sample(grad, clip), kind, alpha_bar, scale)
        latents = scheduler.step(pred, t, latents, **options).prev_sample
    return backbone.decode_latents(latents)


# ------------------------------------------------------------------------------------------------ the config
def _finite(value, key: str, low: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def scorer_node(name: str, scorers_node) -> object:
    """The config node of scorer ``name``: the ``scorers`` mapping's entry (``scorers=[...]``), else the entry of the
    same name in ``conf/scorers/<name>.yaml`` (so ``reward_guidance.scorer=toy_safety`` needs no ``scorers=``); a
    one-line ConfigError naming ``key`` when neither has one."""
    from omegaconf import OmegaConf

    from alignment.cli import CONF_DIR

    if scorers_node is not None and name in scorers_node:
        return scorers_node[name]
    path = Path(CONF_DIR) / "scorers" / f"{name}.yaml"
    node = OmegaConf.load(path) if path.is_file() else None
    if node is None or name not in node or not hasattr(node[name], "get") or "_target_" not in node[name]:
        configured = ", ".join(str(n) for n in (scorers_node or {})) or "none"
        raise ConfigError(f"{KEY}: unknown scorer {name!r} (configured scorers: {configured}; none in "
                          f"conf/scorers/{name}.yaml either)")
    return node[name]


class RewardGuidance:
    """The ``reward_guidance`` settings, checked (module docstring); ``from_config`` returns None when it is off.

    ``load(device)`` builds the scorers; ``masks`` makes or reads one mask per image; ``sample`` runs
    ``sample_with_reward_guidance``; ``settings`` is what generate records with every image."""

    def __init__(self, scorer, scale: float = 1.0, clip: float | None = 1.0, mask: str | None = None,
                 mask_scorer: str | None = None, mask_options=None, grad_through_unet: bool = True,
                 scorers_node=None, resolution: int | None = None):
        from alignment.config import check_keys
        from alignment.objectives.draft import check_differentiable, parse_reward
        from alignment.scorers.base import check_scorer_weights, scorer_class
        from alignment.scorers.masks import build_mask_pipeline, has_heatmap

        self.weights = parse_reward(scorer, f"{KEY}.scorer")
        self.reward_text = scorer if isinstance(scorer, str) else dict(self.weights)
        self.scale = _finite(scale, f"{KEY}.scale")
        self.clip = None if clip is None else _finite(clip, f"{KEY}.clip", 0, strict=True)
        if not isinstance(grad_through_unet, bool):
            raise ConfigError(f"{KEY}.grad_through_unet must be true or false, got {grad_through_unet!r}")
        self.grad_through_unet = grad_through_unet
        self.mask_path, self.mask_source = None, None
        if mask is not None:
            if not isinstance(mask, str) or not mask.strip():
                raise ConfigError(f"{KEY}.mask must be null, heatmap, saliency or the path of a mask image / folder, "
                                  f"got {mask!r}")
            if mask in MASK_KINDS:
                self.mask_source = mask
            else:
                path = Path(mask).expanduser()
                if not path.exists():
                    raise ConfigError(f"{KEY}.mask: {mask!r} is neither a mask kind ({', '.join(MASK_KINDS)}) nor "
                                      f"an existing mask image or folder")
                self.mask_path = path
        if mask_scorer is not None and (not isinstance(mask_scorer, str) or not mask_scorer):
            raise ConfigError(f"{KEY}.mask_scorer must be a scorer name or null, got {mask_scorer!r}")
        if self.mask_source is None:
            if mask_scorer is not None:
                raise ConfigError(f"{KEY}.mask_scorer: only used with {KEY}.mask=heatmap or saliency (mask is "
                                  f"{mask!r})")
            if mask_options:
                raise ConfigError(f"{KEY}.mask_options: only used with {KEY}.mask=heatmap or saliency (mask is "
                                  f"{mask!r})")
        if self.mask_source == "heatmap" and mask_scorer is None:
            if len(self.weights) != 1:
                raise ConfigError(f"{KEY}.mask_scorer: {KEY}.mask=heatmap with several reward scorers needs the name "
                                  f"of the one whose heatmap makes the mask (one of {list(self.weights)})")
            mask_scorer = next(iter(self.weights))
        self.mask_scorer = mask_scorer
        self.mask_options = {} if mask_options is None else mask_options
        self.pipeline = build_mask_pipeline(self.mask_options, self.mask_source, f"{KEY}.mask_options") \
            if self.mask_source else None

        # The scorers, from their classes (no model loads): each configured, differentiable where it is
        # differentiated, with a heatmap where one is asked for, able to score the backbone's images.
        self.nodes = {}
        for name in dict.fromkeys([*self.weights, *([mask_scorer] if mask_scorer else [])]):
            node = scorer_node(name, scorers_node)
            check_keys(node, f"scorers.{name}")
            check_scorer_weights(node, f"scorers.{name}")
            self.nodes[name] = node
            cls = scorer_class(node)
            if cls is None:
                continue
            if name in self.weights:
                check_differentiable(name, cls, "the guidance reward", f"{KEY}.scorer")
            if name == mask_scorer and self.mask_source == "heatmap" and not has_heatmap(cls):
                raise ConfigError(f"{KEY}.mask_scorer: {KEY}.mask=heatmap needs a scorer with a heatmap, but "
                                  f"{name!r} ({cls.__name__}) gives none (use {KEY}.mask=saliency, or a heatmap "
                                  "scorer)")
            if name == mask_scorer and self.mask_source == "saliency":
                check_differentiable(name, cls, "the saliency mask's scorer", f"{KEY}.mask_scorer")
            if resolution is not None and hasattr(cls, "check_resolution"):
                cls.check_resolution(resolution, f"scorers.{name}")
        self.scorers: dict | None = None

    @classmethod
    def from_config(cls, node, scorers_node=None, resolution: int | None = None) -> "RewardGuidance | None":
        """The checked settings of a ``reward_guidance`` node, or None when it is absent or its scorer is null."""
        if node is None:
            return None
        if not hasattr(node, "items"):
            raise ConfigError(f"{KEY} must be a mapping ({', '.join(OPTIONS)}), got {node!r}")
        if node.get("scorer") is None:
            return None
        from alignment.config import to_plain

        for name in node:
            if name not in OPTIONS:
                raise ConfigError(f"{KEY}.{name}: unknown key (accepted: {', '.join(OPTIONS)})")
        values = {name: to_plain(node[name]) if hasattr(node[name], "items") else node[name] for name in node}
        return cls(**values, scorers_node=scorers_node, resolution=resolution)

    # ------------------------------------------------------------------------------------------ use
    def settings(self) -> dict:
        """What generate records with every guided image."""
        mask = str(self.mask_path) if self.mask_path is not None else self.mask_source
        out = {"scorer": self.reward_text, "scale": self.scale, "clip": self.clip, "mask": mask,
               "grad_through_unet": self.grad_through_unet}
        if self.mask_source is not None:
            out.update(mask_scorer=self.mask_scorer, mask_options=dict(self.mask_options))
        return out

    def describe(self) -> str:
        """One line for generate's summary."""
        mask = f", mask {self.settings()['mask']}" if self.mask_path or self.mask_source else ""
        return f"reward {self.reward_text}, scale {self.scale:g}, clip {self.clip}{mask}"

    def load(self, device) -> "RewardGuidance":
        """Build the scorers (frozen) on ``device``."""
        from omegaconf import OmegaConf

        from alignment.scorers.base import build_scorers

        node = OmegaConf.create(dict(self.nodes))
        self.scorers = {name: s.to(device) for name, s in build_scorers(node).items()}
        return self

    @property
    def reward(self) -> Callable:
        """``r(images, prompts) = Σ_k w_k · scorer_k(images, prompts)`` (B,), with gradient; images in [0, 1], moved to
        each scorer's device and dtype (the weighted sum of ``method.reward``, ``alignment.objectives.draft``)."""
        from alignment.objectives.draft import weighted_reward

        if self.scorers is None:
            raise RuntimeError("RewardGuidance.load(device) first")
        scorers, weights = self.scorers, self.weights

        def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
            return weighted_reward(scorers, weights, images, list(prompts), to_scorer=True)[0]
        return reward

    @property
    def needs_unguided(self) -> bool:
        """Whether the masks are made from the unguided image of the same seed."""
        return self.mask_source is not None

    def masks_from_images(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``heatmap`` / ``saliency`` masks (B, 1, H, W) of the unguided images, by Focus-N-Fix's mask pipeline; the
        saliency of the weighted reward itself when ``mask_scorer`` is null."""
        from alignment.scorers.masks import problem_masks

        scorer = self.scorers[self.mask_scorer] if self.mask_scorer is not None else self.reward
        return problem_masks(scorer, images, list(prompts), self.mask_source, self.pipeline).float()

    def masks_from_files(self, indices: Sequence[int], seeds: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, H, W) weights of a given mask image (one for all) or folder (``<prompt:05d>_seed<seed>.png`` or
        ``<prompt:05d>.png``), read as evaluate reads ``metrics.change.mask``."""
        from alignment.evaluation.plan import mask_file
        from alignment.evaluation.scoring import read_mask

        out = []
        for i, seed in zip(indices, seeds):
            path = mask_file(self.mask_path, i, seed)
            if path is None:
                raise ConfigError(f"{KEY}.mask: {self.mask_path} has no mask for prompt {i} seed {seed} (expected "
                                  f"{i:05d}_seed{seed}.png or {i:05d}.png)")
            out.append(read_mask(path, size, key=f"{KEY}.mask"))
        return torch.stack(out)[:, None]

    def check_mask_files(self, count: int, seeds: Sequence[int]) -> None:
        """Before any model loads: a mask folder holds a mask for every prompt and seed."""
        from alignment.evaluation.plan import mask_file

        if self.mask_path is None or self.mask_path.is_file():
            return
        for i in range(count):
            for seed in seeds:
                if mask_file(self.mask_path, i, seed) is None:
                    raise ConfigError(f"{KEY}.mask: {self.mask_path} has no mask for prompt {i} seed {seed} "
                                      f"(expected {i:05d}_seed{seed}.png or {i:05d}.png)")

    def sample(self, backbone, prompts: list[str], seeds: list[int], masks: torch.Tensor | None = None,
               **options) -> torch.Tensor:
        """``sample_with_reward_guidance`` with these settings; ``options`` are ``sample_images``'."""
        return sample_with_reward_guidance(backbone, prompts, seeds, self.reward, self.scale, self.clip, masks,
                                           self.grad_through_unet, **options)
