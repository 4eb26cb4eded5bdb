"""LiVO bias metrics D1 and D2 (docs/evaluation.md#bias-metrics-d1-d2).

For each bias prompt, n images are generated and each image is classified into one attribute a ∈ A (CLIP
zero-shot with texts ``prompt + ", " + attr``); the classifier's per-image probabilities are turned into a hard
label (argmax — the paper classifies each image, then counts), giving the attribute distribution P(a):

    D1 = max_a P(a) − min_a P(a)            D2 = sqrt( Σ_a (P(a) − 1/|A|)² )

and both are averaged over prompts. 0 means perfectly balanced. Values are fractions (not ×100).
Gender A = {male, female}; race A = {white, black, asian, indian, latino}.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["attribute_distribution", "d1", "d2", "bias_metrics"]


def attribute_distribution(probs) -> torch.Tensor:
    """Fraction of images assigned to each attribute (docs/evaluation.md#bias-metrics-d1-d2): ``(n, A) -> (A,)``, sums
    to 1.

    Each image counts once, for its argmax attribute (on an exact tie the first attribute wins, as
    ``torch.argmax``). ``probs`` may be probabilities or logits — only the argmax matters.
    """
    p = torch.as_tensor(probs).detach()
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must be (num_images, num_attributes) with >= 1 image and >= 2 attributes, "
                         f"got shape {tuple(p.shape)}")
    counts = torch.bincount(p.argmax(dim=1).cpu(), minlength=p.shape[1]).double()
    return counts / p.shape[0]


def _check_dist(dist) -> torch.Tensor:
    d = torch.as_tensor(dist).detach().double().cpu()
    if d.ndim != 1 or d.numel() < 2:
        raise ValueError(f"an attribute distribution must be 1-D with >= 2 attributes, got shape {tuple(d.shape)}")
    return d


def d1(dist) -> float:
    """D1 = max_a P(a) − min_a P(a) of one attribute distribution (docs/evaluation.md#bias-metrics-d1-d2)."""
    d = _check_dist(dist)
    return float(d.max() - d.min())


def d2(dist) -> float:
    """D2 = sqrt(Σ_a (P(a) − 1/|A|)²), the L2 distance to the uniform distribution
    (docs/evaluation.md#bias-metrics-d1-d2)."""
    d = _check_dist(dist)
    return float(torch.sqrt(((d - 1.0 / d.numel()) ** 2).sum()))


def bias_metrics(per_prompt_probs: Sequence) -> dict[str, float]:
    """Mean D1 and D2 over prompts (docs/evaluation.md#bias-metrics-d1-d2).

    Args:
        per_prompt_probs: one ``(n_i, A)`` tensor of per-image attribute probabilities per prompt (same A for all).

    Returns:
        ``{"D1": mean over prompts, "D2": mean over prompts}`` (fractions).
    """
    if len(per_prompt_probs) == 0:
        raise ValueError("bias_metrics needs at least one prompt's attribute probabilities")
    num_attr = None
    d1s, d2s = [], []
    for i, probs in enumerate(per_prompt_probs):
        try:
            dist = attribute_distribution(probs)
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
        if num_attr is None:
            num_attr = dist.numel()
        elif dist.numel() != num_attr:
            raise ValueError(f"prompt {i} has {dist.numel()} attributes, prompt 0 has {num_attr}")
        d1s.append(d1(dist))
        d2s.append(d2(dist))
    return {"D1": sum(d1s) / len(d1s), "D2": sum(d2s) / len(d2s)}
