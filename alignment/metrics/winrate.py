"""Win rates between two models with a bootstrap interval over prompts (docs/evaluation.md#win-rate).

Protocol (docs/evaluation.md#win-rate): each model generates ``k`` images per prompt with the same seeds (k = 5 in
BalancedDPO,
k = 1 in HG-DPO); a scorer gives one score per image, so each model has a ``(P, k)`` score matrix per scorer.
Per prompt, model A's best score is compared with model B's best score: a win counts 1, a tie ½ **[choice]**,
a loss 0. ``reduce="mean"`` compares the mean over the k images instead (an extension, not a paper protocol: it
asks "is A better on this prompt across the same seeds" rather than "is A's best image better", and has less
variance when a method removes bad samples without raising the best one). The win rate of A over B is the mean
over prompts, reported with a percentile bootstrap interval (prompts resampled with replacement; deterministic for
a given seed).

Example::

    wr = win_rate(scores_a, scores_b)          # (P, k) each
    print(f"{100 * wr.rate:.1f} [{100 * wr.low:.1f}, {100 * wr.high:.1f}]")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from alignment.metrics.bootstrap import mean_intervals, quantile_interval

__all__ = ["REDUCTIONS", "WinRate", "best_of_k", "prompt_outcomes", "win_rate", "win_rate_table"]

# how the k scores of a prompt become one: the best of k (docs/evaluation.md#win-rate), or their mean
REDUCTIONS = ("best", "mean")


@dataclass(frozen=True)
class WinRate:
    """Win rate of model A over model B (docs/evaluation.md#win-rate): ``rate`` in [0, 1] and its bootstrap interval
    [low, high].

    ``wins + ties + losses == num_prompts``; ``rate == (wins + ties / 2) / num_prompts``. ``low``/``high`` are
    NaN when no bootstrap was asked for (``num_bootstrap=0``).
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    num_prompts: int

    def as_dict(self) -> dict:
        """The fields as a plain dict (for logging / CSV rows)."""
        return asdict(self)


def _as_scores(scores, name: str) -> torch.Tensor:
    """``scores`` as a float64 (P, k) tensor; a 1-D (P,) input is one image per prompt (k = 1, HG-DPO)."""
    t = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (num_prompts, k) score matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds non-finite scores (NaN or inf)")
    return t


def best_of_k(scores) -> torch.Tensor:
    """Best score per prompt (docs/evaluation.md#win-rate): ``(P, k) -> (P,)``, the max over the k images of each
    prompt.

    A 1-D ``(P,)`` input is read as k = 1 and returned unchanged (as float64).
    """
    return _as_scores(scores, "scores").max(dim=1).values


def prompt_outcomes(scores_a, scores_b, reduce: str = "best") -> torch.Tensor:
    """Per-prompt outcome of A vs B (docs/evaluation.md#win-rate): 1 where A's best > B's best, 0.5 on a tie, 0
    otherwise. ``(P,)``.
    ``reduce="mean"`` compares the per-prompt means of the k scores instead.

    Both matrices must have the same shape (paired protocol: same prompts, same seeds, same k).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    a = _as_scores(scores_a, "scores_a")
    b = _as_scores(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must have the same (num_prompts, k) shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if reduce == "best":
        per_a, per_b = a.max(dim=1).values, b.max(dim=1).values
    else:
        per_a, per_b = a.mean(dim=1), b.mean(dim=1)
    return (per_a > per_b).double() + 0.5 * (per_a == per_b).double()


def mean_difference(scores_a, scores_b, num_bootstrap: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """Focus-N-Fix's Δreward of A against B on the same seeds (docs/evaluation.md#reward-change): per prompt the mean
    over its k images of ``score_A − score_B`` (image j of both from the same start noise), then the mean over
    prompts, with a percentile bootstrap interval over prompts. Returns {value, low, high, num_prompts}; an
    interval above 0 means A raised the score beyond the prompts' noise."""
    a, b = _as_scores(scores_a, "scores_a"), _as_scores(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a {tuple(a.shape)} and scores_b {tuple(b.shape)} must have the same shape")
    per_prompt = (a - b).mean(dim=1)
    low = high = None
    if num_bootstrap > 0 and per_prompt.numel() > 1:
        low, high = mean_intervals(per_prompt, num_bootstrap, confidence, seed)[0]
    return {"value": float(per_prompt.mean()), "low": low, "high": high, "num_prompts": int(per_prompt.numel())}


def paired_seed_bootstrap(statistic, model: Sequence, reference: Sequence, num_bootstrap: int = 2000,
                          seed: int = 0, confidence: float = 0.95) -> dict:
    """``statistic(per_prompt)`` of a model, of the reference and their difference, each with a percentile bootstrap
    interval that resamples **images** (seeds) within every prompt — the same seed indices for both models, since
    image j of both starts from the same noise (a paired comparison; docs/evaluation.md#paired-image-intervals).
    For metrics defined over a prompt's whole image set (LiVO's D1 / D2, Avg.R), whose noise is that of the n images
    per prompt rather than of the few prompts.

    ``model`` / ``reference``: one tensor per prompt whose first dimension is the prompt's images (the same count
    for both). ``statistic`` maps such a list to a float. Returns ``{model, reference, delta}``, each ``{value, low,
    high}`` (no interval with ``num_bootstrap=0``)."""
    if len(model) != len(reference) or not model:
        raise ValueError(f"model and reference need the same number (>= 1) of prompts, got {len(model)} and "
                         f"{len(reference)}")
    for i, (a, b) in enumerate(zip(model, reference)):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"prompt {i}: {a.shape[0]} model images but {b.shape[0]} reference images")
    own, ref = float(statistic(list(model))), float(statistic(list(reference)))
    out = {"model": {"value": own, "low": None, "high": None},
           "reference": {"value": ref, "low": None, "high": None},
           "delta": {"value": own - ref, "low": None, "high": None}}
    if num_bootstrap <= 0:
        return out
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.empty(num_bootstrap, 2, dtype=torch.float64)
    for r in range(num_bootstrap):
        index = [torch.randint(0, a.shape[0], (a.shape[0],), generator=gen) for a in model]
        draws[r, 0] = statistic([a[i] for a, i in zip(model, index)])
        draws[r, 1] = statistic([b[i] for b, i in zip(reference, index)])
    low, high = quantile_interval(torch.stack([draws[:, 0], draws[:, 1], draws[:, 0] - draws[:, 1]], dim=1),
                                  confidence)
    for i, name in enumerate(("model", "reference", "delta")):
        out[name]["low"], out[name]["high"] = float(low[i]), float(high[i])
    return out


def win_rate(scores_a, scores_b, num_bootstrap: int = 2000, seed: int = 0,
             confidence: float = 0.95, reduce: str = "best") -> WinRate:
    """Win rate of model A over model B with a percentile bootstrap interval over prompts (docs/evaluation.md#win-rate).

    Args:
        scores_a, scores_b: ``(P, k)`` scores of the two models' images (same prompts and seeds, row i = prompt i);
            a 1-D ``(P,)`` tensor means k = 1.
        num_bootstrap: bootstrap replicates (0: no interval, ``low``/``high`` are NaN).
        seed: seed of the resampling generator (same inputs and seed -> same interval).
        confidence: interval mass, in (0, 1).
        reduce: ``best`` (docs/evaluation.md#win-rate: best of k per prompt) or ``mean`` (mean of the k scores per
        prompt).

    Raises:
        ValueError: shapes differ (the message names both), empty or non-finite scores, bad arguments.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
    outcomes = prompt_outcomes(scores_a, scores_b, reduce)
    wins = int((outcomes == 1.0).sum())
    ties = int((outcomes == 0.5).sum())
    n = outcomes.numel()
    rate = float(outcomes.mean())
    if num_bootstrap > 0:
        interval = mean_intervals(outcomes, num_bootstrap, confidence, seed)[0]
        low, high = interval if interval is not None else (rate, rate)   # one prompt: each resample is it
    else:
        low = high = float("nan")
    return WinRate(rate=rate, low=low, high=high, wins=wins, ties=ties, losses=n - wins - ties, num_prompts=n)


def win_rate_table(scores: Mapping[str, Mapping[str, object]], num_bootstrap: int = 2000, seed: int = 0,
                   confidence: float = 0.95, reduce: str = "best") -> list[dict]:
    """Win rates of every ordered model pair on every scorer, like the papers' Tables 1–3 (docs/evaluation.md#win-rate).

    Args:
        scores: ``{model: {scorer: (P, k) scores}}``; all models must be scored on the same prompts and seeds.

    Returns:
        One dict per (model_a, model_b, scorer) with ``model_a != model_b``, in the order of ``scores`` and of
        each model's scorers: keys ``model_a, model_b, scorer`` plus the :class:`WinRate` fields. A scorer is
        compared only between models that both have it; every pair uses the same bootstrap ``seed``.
    """
    rows: list[dict] = []
    models = list(scores)
    for model_a in models:
        for model_b in models:
            if model_a == model_b:
                continue
            for scorer, sa in scores[model_a].items():
                if scorer not in scores[model_b]:
                    continue
                try:
                    wr = win_rate(sa, scores[model_b][scorer], num_bootstrap=num_bootstrap, seed=seed,
                                  confidence=confidence, reduce=reduce)
                except ValueError as err:
                    raise ValueError(f"{model_a} vs {model_b} on {scorer}: {err}") from None
                rows.append({"model_a": model_a, "model_b": model_b, "scorer": scorer, **wr.as_dict()})
    return rows
