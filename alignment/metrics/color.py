"""HG-DPO colour-shift metric (docs/evaluation.md#colour-shift, Table 2 of the paper).

Images are converted to HSV with every channel in [0, 1] (hue in [0, 1), i.e. degrees / 360); each channel is
averaged over all pixels of the image set (a plain mean, every pixel weighs the same), and the shift of the aligned
model relative to the target (SFT) model is reported per channel as

    100 · |mean_aligned − mean_target| / mean_target        (percent).

The HSV conversion follows Python's ``colorsys.rgb_to_hsv``: V = max(R,G,B), S = (max − min) / max (0 where
max = 0), H = 0 for greys (max = min) by convention, ties between channels resolved in the order R, G, B.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch

__all__ = ["rgb_to_hsv", "hsv_means", "color_shift"]

Images = Union[torch.Tensor, Iterable[torch.Tensor]]
_RANGE_TOL = 1e-4  # values this far outside [0, 1] are treated as rounding and clamped


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if images.numel() and (images.min() < -_RANGE_TOL or images.max() > 1 + _RANGE_TOL):
        raise ValueError(f"{name} must be in [0, 1] (metrics see [0, 1], docs/conventions.md#pixel-ranges), got "
                         f"values in [{float(images.min()):.3f}, {float(images.max()):.3f}]")
    return images.clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> HSV (B, 3, H, W), H in [0, 1), S and V in [0, 1] (docs/evaluation.md#colour-shift).

    Matches ``colorsys.rgb_to_hsv`` per pixel (greys: S = 0, H = 0). Differentiable almost everywhere.
    """
    x = _check_images(images)
    if not x.is_floating_point():
        x = x.float()
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    grey = delta <= 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(h >= 1.0, h - 1.0, h)  # float rounding of remainder(-tiny, 1) can give exactly 1
    h = torch.where(grey, torch.zeros_like(h), h)
    s = torch.where(grey, torch.zeros_like(delta), delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)))
    return torch.stack([h, s, maxc], dim=1)


def hsv_means(images: Images) -> torch.Tensor:
    """Plain mean of H, S and V over all pixels of an image set (docs/evaluation.md#colour-shift): ``(3,)`` float64.

    ``images`` is one (B, 3, H, W) tensor in [0, 1] or an iterable of such batches (sizes may differ; every
    pixel counts once, so a large set can be streamed batch by batch).
    """
    batches = [images] if isinstance(images, torch.Tensor) else images
    total = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i, batch in enumerate(batches):
        hsv = rgb_to_hsv(_check_images(batch, "images" if isinstance(images, torch.Tensor) else f"images[{i}]"))
        total += hsv.detach().double().sum(dim=(0, 2, 3)).cpu()
        count += hsv.shape[0] * hsv.shape[2] * hsv.shape[3]
    if count == 0:
        raise ValueError("hsv_means needs at least one pixel")
    return total / count


def color_shift(aligned: Images, target: Images) -> dict[str, float]:
    """Colour shift of an aligned model's images relative to the target model's, per HSV channel
    (docs/evaluation.md#colour-shift).

    Returns ``{"H": 100·|m_a − m_t| / m_t, "S": ..., "V": ...}`` in percent, with m the :func:`hsv_means` of
    each set. Raises ValueError when a target channel mean is 0 (the relative shift is undefined).
    """
    m_a = hsv_means(aligned)
    m_t = hsv_means(target)
    out = {}
    for i, name in enumerate("HSV"):
        if m_t[i] <= 0:
            raise ValueError(f"target mean of channel {name} is 0; the relative colour shift is undefined")
        out[name] = float(100.0 * (m_a[i] - m_t[i]).abs() / m_t[i])
    return out
