"""The percentile bootstrap over prompts behind every interval of ``alignment.evaluate``'s tables (win rates, Δscore,
colour shift, LiVO's D1 / D2 and toxicity metrics; docs/evaluation.md#paired-image-intervals says when to resample
a prompt's images instead).

Prompts are resampled with replacement ``num_bootstrap`` times: replicate r takes the prompt indices of row r of
``torch.randint(0, P, (num_bootstrap, P), generator=torch.Generator().manual_seed(seed))`` (drawn a chunk of rows
at a time to bound memory, which leaves the stream unchanged), every column of a ``(P, M)`` table with the same
indices (a paired resample when the columns are two models' values). The interval is the ``(1 − confidence)/2``
and ``1 − (1 − confidence)/2`` quantiles (linear interpolation, as ``numpy.percentile``) of the replicates.
"""

from __future__ import annotations

import torch

__all__ = ["mean_intervals", "quantile_interval", "resampled_means"]

_CHUNK = 256            # bootstrap replicates drawn at a time ...
_ELEMENTS = 1 << 22     # ... and at most this many resampled values at once (memory for large prompt sets)


def _table(values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"values must be (num_prompts,) or (num_prompts, M), got shape {tuple(t.shape)}")
    return t


def resampled_means(values, num_bootstrap: int, seed: int) -> torch.Tensor:
    """``values``: (P,) or (P, M) per-prompt values -> ``(num_bootstrap, M)`` float64 column means of the resampled
    prompts (module docstring; every column resampled with the same prompts)."""
    table = _table(values)
    n, m = table.shape
    if n == 0:
        raise ValueError("the bootstrap needs at least one prompt")
    gen = torch.Generator().manual_seed(int(seed))
    chunk = max(1, min(_CHUNK, _ELEMENTS // (n * max(1, m))))
    means = []
    for start in range(0, num_bootstrap, chunk):
        rows = min(chunk, num_bootstrap - start)
        index = torch.randint(0, n, (rows, n), generator=gen)
        means.append(table[index].mean(dim=1))
    return torch.cat(means) if means else torch.zeros(0, m, dtype=torch.float64)


def quantile_interval(samples, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The percentile interval of bootstrap replicates: ``samples`` (B,) or (B, M) -> (low, high), each (M,) (a
    0-d tensor for 1-D samples)."""
    s = torch.as_tensor(samples, dtype=torch.float64)
    alpha = (1.0 - confidence) / 2.0
    q = torch.quantile(s, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=0)
    return q[0], q[1]


def mean_intervals(values, num_bootstrap: int, confidence: float, seed: int) -> list[tuple[float, float] | None]:
    """The interval of the mean over prompts of each column: ``values`` (P,) or (P, M) -> one (low, high) per column
    (None when ``num_bootstrap`` is 0 or there are fewer than 2 prompts)."""
    table = _table(values)
    if num_bootstrap <= 0 or table.shape[0] < 2:
        return [None] * table.shape[1]
    low, high = quantile_interval(resampled_means(table, num_bootstrap, seed), confidence)
    return [(float(a), float(b)) for a, b in zip(low, high)]
