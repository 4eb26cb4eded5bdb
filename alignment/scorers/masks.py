"""Region masks from scorers: where an image is "problematic" (docs/methods.md#masks).

Focus-N-Fix constrains fine-tuning to the region a mask marks; reward guidance with a regional constraint uses the
same masks at sampling time. A mask comes from a scorer in one of two ways:

- **heatmap**: the scorer localises the flaw itself (``scorer.heatmap(images, prompts) -> (B, h, w)``, e.g. the toy
  world's ``toy_artifacts`` / ``toy_safety``); the map is resized to the image and thresholded;
- **saliency**: the scorer gives one score per image; its gradient saliency ``S = Σ_channels |∂r/∂I|`` (Simonyan et
  al. 2014) says which pixels the score depends on.

Either map then runs through the same pipeline (``MaskPipeline``), every step a knob, sizes given at a reference
resolution (512 px) and scaled with the image side:

1. Gaussian smoothing (kernel 16, σ 4 at 512 px; kernel 0 switches it off),
2. threshold: an absolute ``threshold`` on the map, or (``threshold: null``) the ``percentile`` of each image's map
   (strictly above it: a constant map — a score that ignores the image — gives an empty mask),
3. the main connected regions (8-connectivity): those with at least ``min_region_fraction`` of the largest region's
   area, at most ``max_regions`` of them (largest first),
4. dilation by a disc of radius ``dilation`` (8 px at 512 px = side / 64),

giving a binary mask (B, 1, H, W), 1 = the region to fix. Everything is plain torch (no scipy / torchvision), runs on
the images' device and needs no gradient (except the saliency's own backward pass through the scorer).

``regional_penalty(reference, images, mask)`` is Focus-N-Fix's constraint ``‖(1 − M) ⊙ (Î₀ − Î)‖_F`` per image, and
``mask_overlay`` tints a mask onto images for a sample grid or a logger.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from alignment.errors import ConfigError

__all__ = ["AUTO_OPTIONS", "MASK_SOURCES", "MaskPipeline", "build_mask_pipeline", "connected_regions", "dilate", "gaussian_smooth", "has_heatmap",
           "heatmap_map", "keep_main_regions", "mask_overlay", "problem_masks", "regional_penalty", "saliency_map",
           "scaled_size"]

MASK_SOURCES = ("saliency", "heatmap", "ones")


def has_heatmap(scorer) -> bool:
    """Whether a scorer (class or instance) localises what it scores: a callable ``heatmap(images, prompts)``."""
    return callable(getattr(scorer, "heatmap", None))


# ------------------------------------------------------------------------------------------------ maps
def saliency_map(score_fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], images: torch.Tensor,
                 prompts: Sequence[str]) -> torch.Tensor:
    """``Σ_channels |∂r/∂I|`` per pixel, (B, H, W), for scores ``r = score_fn(images, prompts)`` (B,).

    The images are detached first, so only the scorer is differentiated (never the model that made them); the
    gradient is taken even inside an outer ``torch.no_grad()``. Scores of different images must not depend on each
    other (true of every scorer in eval mode), so the gradient of their sum is each image's own."""
    x = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        scores = score_fn(x, prompts)
        grad = None
        if scores.requires_grad:
            (grad,) = torch.autograd.grad(scores.float().sum(), x, allow_unused=True)
    if grad is None:  # the score does not depend on the pixels at all
        return torch.zeros(x.shape[0], *x.shape[-2:], device=x.device)
    return grad.abs().sum(dim=1)


@torch.no_grad()
def heatmap_map(scorer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The scorer's heatmap (B, h, w) resized (bilinear) to the images' (H, W) -> (B, H, W)."""
    heat = scorer.heatmap(images, prompts).float()
    if heat.ndim == 4:
        heat = heat[:, 0]
    if heat.shape[-2:] != images.shape[-2:]:
        heat = F.interpolate(heat[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return heat


# ------------------------------------------------------------------------------------------------ pipeline steps
def scaled_size(value: float, side: int, reference_resolution: int) -> float:
    """``value`` (given at ``reference_resolution`` px) at an image side of ``side`` px."""
    return float(value) * side / float(reference_resolution)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def gaussian_smooth(maps: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with a ``kernel_size`` window (even sizes allowed: the window is
    then centred half a pixel off, as a 16-tap kernel must be) and replicate padding; same size out. A kernel of 1 or
    less, or σ ≤ 0, returns the maps unchanged."""
    if kernel_size <= 1 or sigma <= 0:
        return maps
    x = maps.float()[:, None]
    positions = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    weights = torch.exp(-positions ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    before, after = (kernel_size - 1) // 2, kernel_size // 2
    x = F.conv2d(F.pad(x, (before, after, 0, 0), mode="replicate"), weights.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, before, after), mode="replicate"), weights.view(1, 1, -1, 1))
    return x[:, 0]


def connected_regions(mask: torch.Tensor) -> torch.Tensor:
    """Labels of the 8-connected regions of binary masks (B, H, W): 0 = background, each region a positive label
    (the largest pixel index + 1 in it; not consecutive). Label propagation by 3×3 max-pooling, restricted to the
    mask, until nothing changes."""
    fg = mask.bool()
    b, h, w = fg.shape
    index = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    labels = torch.where(fg, index, torch.zeros((), device=fg.device))
    for _ in range(h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0]
        grown = torch.where(fg, grown, torch.zeros((), device=fg.device))
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def keep_main_regions(mask: torch.Tensor, min_region_fraction: float = 0.1,
                      max_regions: int | None = None) -> torch.Tensor:
    """Binary masks (B, H, W) reduced to their main connected regions: those whose area is at least
    ``min_region_fraction`` × the largest region's, at most ``max_regions`` of them (the largest; ties by label)."""
    labels = connected_regions(mask)
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(labels.shape[0]):
        ids, areas = torch.unique(labels[i][labels[i] > 0], return_counts=True)
        if ids.numel() == 0:
            continue
        order = torch.argsort(areas, descending=True, stable=True)
        ids, areas = ids[order], areas[order]
        keep = areas >= min_region_fraction * areas[0]
        if max_regions is not None:
            keep &= torch.arange(ids.numel(), device=ids.device) < max_regions
        out[i] = torch.isin(labels[i], ids[keep])
    return out


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary masks (B, H, W) dilated by a disc of ``radius`` pixels (0: unchanged)."""
    if radius <= 0:
        return mask.bool()
    r = int(radius)
    offsets = torch.arange(-r, r + 1, device=mask.device, dtype=torch.float32)
    disc = ((offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) <= r * r + 1e-6).float()
    hits = F.conv2d(mask.float()[:, None], disc.view(1, 1, 2 * r + 1, 2 * r + 1), padding=r)
    return hits[:, 0] > 0.5


# ------------------------------------------------------------------------------------------------ the pipeline
class MaskPipeline:
    """A map (heatmap or saliency) -> a binary mask (B, 1, H, W); see the module docstring for the steps.

    Sizes (``smoothing_kernel``, ``smoothing_sigma``, ``dilation``) are given in pixels at ``reference_resolution``
    and scaled by ``image side / reference_resolution`` (kernel and radius rounded half up, the kernel at least 1).
    ``threshold``: an absolute level on the (smoothed) map, or null to use the ``percentile`` of each image's map.
    ``key`` names the config node in errors."""

    def __init__(self, smoothing_kernel: int = 16, smoothing_sigma: float = 4.0, threshold: float | None = None,
                 percentile: float = 90.0, min_region_fraction: float = 0.1, max_regions: int | None = None,
                 dilation: float = 8.0, reference_resolution: int = 512, key: str = "method.mask_options"):
        def number(value, name, low=None, high=None, integer=False):
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (not integer or float(value).is_integer())
            ok = ok and (low is None or value >= low) and (high is None or value <= high)
            if not ok:
                bounds = (f" in [{low}, {high}]" if high is not None else f" >= {low}") if low is not None else ""
                what = "an integer" if integer else "a number"
                raise ConfigError(f"{key}.{name} must be {what}{bounds}, got {value!r}")
            return int(value) if integer else float(value)

        self.smoothing_kernel = number(smoothing_kernel, "smoothing_kernel", 0, integer=True)
        self.smoothing_sigma = number(smoothing_sigma, "smoothing_sigma", 0)
        self.threshold = None if threshold is None else number(threshold, "threshold")
        self.percentile = number(percentile, "percentile", 0, 100)
        self.min_region_fraction = number(min_region_fraction, "min_region_fraction", 0, 1)
        self.max_regions = None if max_regions is None else number(max_regions, "max_regions", 1, integer=True)
        self.dilation = number(dilation, "dilation", 0)
        self.reference_resolution = number(reference_resolution, "reference_resolution", 1, integer=True)
        self.key = key

    def sizes(self, side: int) -> tuple[int, float, int]:
        """(kernel, σ, dilation radius) at an image side of ``side`` px."""
        kernel = 0 if self.smoothing_kernel == 0 else max(1, _round_half_up(
            scaled_size(self.smoothing_kernel, side, self.reference_resolution)))
        sigma = scaled_size(self.smoothing_sigma, side, self.reference_resolution)
        radius = _round_half_up(scaled_size(self.dilation, side, self.reference_resolution))
        return kernel, sigma, radius

    @torch.no_grad()
    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) maps -> (B, 1, H, W) float masks of 0 and 1."""
        if maps.ndim == 4:
            maps = maps[:, 0]
        if maps.ndim != 3:
            raise ValueError(f"mask maps must be (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}")
        kernel, sigma, radius = self.sizes(min(maps.shape[-2:]))
        smooth = gaussian_smooth(maps.float(), kernel, sigma)
        if self.threshold is not None:
            binary = smooth > self.threshold
        else:
            level = torch.quantile(smooth.flatten(1), self.percentile / 100.0, dim=1).view(-1, 1, 1)
            binary = smooth > level
        binary = keep_main_regions(binary, self.min_region_fraction, self.max_regions)
        return dilate(binary, radius).float()[:, None]


# Knobs left null take the map's own default: saliency maps are smoothed (kernel 16 at 512 px) and cut at the
# percentile; heatmaps are already localised maps in [0, 1], not smoothed and cut at an absolute level.
AUTO_OPTIONS = {"saliency": {"smoothing_kernel": 16, "threshold": "percentile"},
                "heatmap": {"smoothing_kernel": 0, "threshold": 0.5}}


def build_mask_pipeline(options, source: str, key: str) -> MaskPipeline:
    """A config node of ``MaskPipeline`` knobs -> the pipeline for maps of ``source`` (heatmap / saliency): an unknown
    knob is named (``key.<knob>``); ``smoothing_kernel`` and ``threshold`` left null take the source's default
    (``AUTO_OPTIONS``); ``threshold: percentile`` cuts at the percentile whatever the source."""
    import inspect

    if options is None:
        options = {}
    if not hasattr(options, "items"):
        raise ConfigError(f"{key} must be a mapping of mask knobs, got {options!r}")
    accepted = [name for name in inspect.signature(MaskPipeline.__init__).parameters if name not in ("self", "key")]
    for name in options:
        if name not in accepted:
            raise ConfigError(f"{key}.{name}: unknown key (accepted: {', '.join(accepted)})")
    options = dict(options)
    for name, default in AUTO_OPTIONS.get(source, AUTO_OPTIONS["saliency"]).items():
        if options.get(name) is None:
            options[name] = default
    if options["threshold"] == "percentile":
        options["threshold"] = None
    return MaskPipeline(**options, key=key)


def problem_masks(scorer, images: torch.Tensor, prompts: Sequence[str], source: str,
                  pipeline: MaskPipeline) -> torch.Tensor:
    """Binary masks (B, 1, H, W) of where ``scorer`` finds images (B, 3, H, W) in [0, 1] problematic: its heatmap
    (``source="heatmap"``) or the gradient saliency of its score (``"saliency"``), through ``pipeline``. ``ones`` gives
    all-ones masks. Shared by Focus-N-Fix's training masks, evaluation masks and masked reward guidance."""
    if source == "ones":
        return torch.ones_like(images[:, :1])
    if source == "heatmap":
        maps = heatmap_map(scorer, images, prompts)
    elif source == "saliency":
        maps = saliency_map(scorer, images, prompts)
    else:
        raise ValueError(f"mask source must be one of {', '.join(MASK_SOURCES)}, got {source!r}")
    return pipeline(maps).to(images.device)


# ------------------------------------------------------------------------------------------------ use
def regional_penalty(reference: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``‖(1 − M) ⊙ (Î₀ − Î)‖_F`` per image (B,): the Frobenius norm over channels and pixels of the change outside
    the mask, on images in [0, 1]. ``mask`` (B, 1, H, W) or (B, H, W) broadcasts over the channels."""
    if mask.ndim == 3:
        mask = mask[:, None]
    outside = (1 - mask.to(images.dtype)) * (reference.to(images.dtype) - images)
    return torch.linalg.vector_norm(outside.flatten(1), dim=1)


def mask_overlay(images: torch.Tensor, masks: torch.Tensor, colour: Sequence[float] = (1.0, 0.0, 0.0),
                 alpha: float = 0.45) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] with the mask tinted in ``colour`` (for a sample grid or a logger)."""
    if masks.ndim == 3:
        masks = masks[:, None]
    tint = torch.tensor(colour, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    weight = alpha * masks.to(images.dtype)
    return images * (1 - weight) + tint * weight
