"""Percentile bootstrap intervals of means over prompts, for metrics that are averages of per-prompt values (LiVO's
D1 / D2 and toxicity metrics; docs/evaluation.md#bias-metrics-d1-d2): prompts are resampled with replacement
``num_bootstrap`` times from a generator seeded with ``seed`` (the win-rate settings), and the interval is the
``(1 − confidence)/2`` and ``1 − (1 − confidence)/2`` quantiles of the resampled means."""

from __future__ import annotations

import numpy as np


def mean_intervals(values, num_bootstrap: int, confidence: float, seed: int) -> list[tuple[float, float] | None]:
    """``values``: (P,) or (P, M) per-prompt values -> one (low, high) per column (None when ``num_bootstrap`` is 0
    or there are fewer than 2 prompts)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if num_bootstrap <= 0 or array.shape[0] < 2:
        return [None] * array.shape[1]
    index = np.random.default_rng(seed).integers(0, array.shape[0], size=(num_bootstrap, array.shape[0]))
    means = array[index].mean(axis=1)                                   # (num_bootstrap, M)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=0)
    return [(float(a), float(b)) for a, b in zip(low, high)]
