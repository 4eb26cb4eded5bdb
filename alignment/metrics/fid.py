"""Fréchet Inception Distance and Inception Score in torch (float64, no scipy, nothing downloaded).

FID between two image sets is the Fréchet distance between Gaussians fitted to their features:
``||mu1 − mu2||² + tr(S1 + S2 − 2·(S1 S2)^{1/2})``, where ``tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2})``
is computed from two symmetric eigendecompositions (tiny negative eigenvalues from round-off are clamped to 0).
The covariance is the unbiased one (``np.cov(rowvar=False)``, as pytorch-fid).

The feature network is anything that follows :class:`FeatureExtractor`: a callable taking images ``(B, 3, H, W)``
in [0, 1] and returning ``(B, D)`` features. :class:`~alignment.metrics.inception.InceptionV3` loaded from a local
weight file (``InceptionV3.from_file``) gives the standard 2048-d FID; a custom extractor (e.g. a CLIP image tower)
gives an FID-like distance in its own feature space (not comparable with published FIDs).

Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` on each of ``splits`` consecutive chunks, reported as the mean and
the population standard deviation over chunks (the original openai/improved-gan code; torchmetrics shuffles first
and uses the unbiased std). Numbers comparable with the literature need the FID-variant weights
(``pt_inception-2015-12-05``): the original IS code takes the softmax over all 1008 logits of that graph, computed
without the ``fc`` bias, which is what ``InceptionV3(variant="fid")`` returns. With torchvision's weights the score
is over its 1000 ImageNet classes: a valid IS, but a different classifier, so values differ from published ones.
Any classifier returning ``(B, C)`` logits or probabilities works.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FeatureExtractor", "sqrtm_psd", "frechet_distance", "feature_statistics", "fid", "inception_score",
           "images_to_batches", "extract_features", "compute_fid", "compute_inception_score"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images ``(B, 3, H, W)`` with values in [0, 1] → features ``(B, D)``.

    An :class:`~alignment.metrics.inception.InceptionV3` (whose output is ``(features, logits)``) also qualifies:
    :func:`extract_features` takes the ``features`` field of such outputs.
    """

    def __call__(self, images: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------- statistics
def _f64(x: Any) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to("cpu", torch.float64)


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def sqrtm_psd(matrix: Any) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix (float64), by ``eigh``.

    The matrix is symmetrised first and negative eigenvalues (round-off in a PSD matrix) are clamped to 0.
    """
    m = _f64(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"sqrtm_psd expects a square matrix, got shape {tuple(m.shape)}")
    vals, vecs = torch.linalg.eigh(_sym(m))
    return _sym((vecs * vals.clamp_min(0).sqrt()) @ vecs.T)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``||mu1 − mu2||² + tr(sigma1) + tr(sigma2) − 2·tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})``; the trace of the
    square root is the sum of the square roots of the (clamped ≥ 0) eigenvalues of the symmetric middle matrix.
    Accepts torch tensors or numpy arrays. The result is clamped at 0 (it is ≥ 0 in exact arithmetic).
    """
    mu1, mu2, s1, s2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1), _f64(sigma1), _f64(sigma2)
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    for name, t in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"frechet_distance: {name} holds non-finite values")
    s1, s2 = _sym(s1), _sym(s2)
    root1 = sqrtm_psd(s1)
    middle = _sym(root1 @ s2 @ root1)
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return max(float(value), 0.0)


def feature_statistics(features: Any) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (``np.cov(rowvar=False)``)."""
    f = _f64(features)
    if f.ndim != 2:
        raise ValueError(f"feature_statistics expects features of shape (N, D), got {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs at least 2 samples to estimate a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    return mu, _sym(centred.T @ centred / (f.shape[0] - 1))


def fid(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def inception_score(preds: Any, splits: int = 10, from_logits: bool | None = None) -> tuple[float, float]:
    """Inception Score of class predictions (N, C): ``(mean, std)`` over ``splits`` consecutive chunks.

    Each chunk scores ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the chunk's mean prediction. ``preds`` are
    logits (softmax taken here, in float64) or probabilities; ``from_logits=None`` decides by whether every row is
    non-negative and sums to 1. Chunks are ``preds[i·N//splits : (i+1)·N//splits]`` (no shuffling), the std is the
    population std over chunks, as in the original code.
    """
    p = _f64(preds)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"inception_score expects predictions of shape (N, C), got {tuple(p.shape)}")
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits must be in [1, {n}] for {n} predictions, got {splits}")
    if not torch.isfinite(p).all():
        raise ValueError("inception_score: predictions hold non-finite values")
    if from_logits is None:
        from_logits = not (bool((p >= 0).all()) and bool(torch.allclose(p.sum(1), torch.ones(n, dtype=p.dtype),
                                                                        atol=1e-3)))
    if from_logits:
        log_p = torch.log_softmax(p, dim=1)
    else:
        q = p.clamp_min(0)
        log_p = torch.log((q / q.sum(1, keepdim=True)).clamp_min(1e-300))
    probs = log_p.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part, log_part = probs[lo:hi], log_p[lo:hi]
        log_marginal = torch.log(part.mean(0, keepdim=True).clamp_min(1e-300))
        kl = (part * (log_part - log_marginal)).sum(1).mean()
        scores.append(math.exp(float(kl)))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


# ---------------------------------------------------------------------------------------------------- images
def _image_to_tensor(image: Any) -> Tensor:
    """One image (PIL, HWC numpy array, or CHW tensor) → float CHW tensor in [0, 1]."""
    if isinstance(image, Tensor):
        t = image
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - PIL is a project dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not isinstance(image, np.ndarray):
            raise TypeError(f"cannot turn a {type(image).__name__} into an image tensor "
                            "(expected a PIL image, a numpy array or a torch tensor)")
        arr = image[..., None] if image.ndim == 2 else image
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"an image must have 3 dimensions (C, H, W), got shape {tuple(t.shape)}")
    return _to_unit(t)


def _to_unit(t: Tensor) -> Tensor:
    """uint8 → /255; floats are checked to lie in [0, 1]; 1 channel → 3 channels."""
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {t.dtype}")
    c_dim = t.ndim - 3
    if t.shape[c_dim] == 1:
        t = t.expand(*t.shape[:c_dim], 3, *t.shape[c_dim + 1:])
    if t.shape[c_dim] != 3:
        raise ValueError(f"images must have 1 or 3 channels in dimension {c_dim}, got shape {tuple(t.shape)}")
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"images must have values in [0, 1], got [{lo:.3g}, {hi:.3g}]"
                             + (" (for [-1, 1] images use (x + 1) / 2)" if lo < 0 else ""))
    return t


def images_to_batches(images: Any, batch_size: int = 50) -> Iterator[Tensor]:
    """Yield float batches (B, 3, H, W) in [0, 1] from a tensor (N, 3, H, W) / (3, H, W) — uint8 or float — or a
    sequence of PIL images, HWC numpy arrays or CHW tensors. Images of different sizes inside a batch are yielded
    one at a time (the extractor is expected to resize them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2)
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"an image tensor must have shape (N, 3, H, W), got {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield _to_unit(images[start:start + batch_size])
        return
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(f"images must be a tensor or a sequence of images, got {type(images).__name__}")
    for start in range(0, len(images), batch_size):
        chunk = [_image_to_tensor(img) for img in images[start:start + batch_size]]
        if all(c.shape == chunk[0].shape for c in chunk):
            yield torch.stack(chunk)
        else:
            yield from (c.unsqueeze(0) for c in chunk)


def _pick(output: Any, field: str) -> Tensor:
    """A plain tensor output is used as is; an ``InceptionOutput``-like output gives its ``field``."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, field):
        return getattr(output, field)
    raise TypeError(f"the extractor returned a {type(output).__name__}; expected a (B, D) tensor "
                    f"or an output with a '{field}' field")


def _module_device(model: Any) -> torch.device | None:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


@torch.no_grad()
def extract_features(images: Any, extractor: FeatureExtractor, batch_size: int = 50,
                     device: str | torch.device | None = None, field: str = "features") -> Tensor:
    """Run ``extractor`` over ``images`` in batches; returns float64 CPU features (N, D).

    Batches go to ``device`` (default: the extractor's parameters' device, if it is a module). An ``nn.Module``
    extractor is put in eval mode for the call and restored afterwards. ``field`` picks the part of a structured
    output (``"features"`` or ``"logits"`` for :class:`InceptionV3`).
    """
    device = torch.device(device) if device is not None else _module_device(extractor)
    was_training = isinstance(extractor, nn.Module) and extractor.training
    if isinstance(extractor, nn.Module):
        extractor.eval()
    outs = []
    try:
        for batch in images_to_batches(images, batch_size):
            if device is not None:
                batch = batch.to(device)
            out = _pick(extractor(batch), field)
            if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                raise ValueError(f"the extractor must return ({batch.shape[0]}, D) for a batch of "
                                 f"{batch.shape[0]} images, got {tuple(out.shape)}")
            outs.append(out.detach().to("cpu", torch.float64))
    finally:
        if was_training:
            extractor.train()
    if not outs:
        raise ValueError("no images to compute the metric on")
    return torch.cat(outs)


def compute_fid(images_a: Any, images_b: Any, extractor: FeatureExtractor, batch_size: int = 50,
                device: str | torch.device | None = None) -> float:
    """FID between two image sets (tensors or sequences of PIL images, values in [0, 1] / uint8) with any
    :class:`FeatureExtractor` (e.g. ``InceptionV3.from_file(path)``). Each set needs ≥ 2 images; the estimate is
    biased upward for small sets (the standard practice uses thousands)."""
    fa = extract_features(images_a, extractor, batch_size, device)
    fb = extract_features(images_b, extractor, batch_size, device)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sizes differ between the two sets: {fa.shape[1]} vs {fb.shape[1]}")
    return fid(fa, fb)


def compute_inception_score(images: Any, classifier: Any, splits: int = 10, batch_size: int = 50,
                            device: str | torch.device | None = None,
                            from_logits: bool | None = None) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` of an image set under ``classifier`` (images → (B, C) logits or
    probabilities, or an :class:`InceptionV3`, whose ``logits`` field is used)."""
    preds = extract_features(images, classifier, batch_size, device, field="logits")
    return inception_score(preds, splits=splits, from_logits=from_logits)
