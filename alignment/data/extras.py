"""Per-sample extra columns (``dataset.extra_columns``): values a dataset carries beside images and captions — LiVO's
``value``, a vote label, a seed, a vector of scores — and that reach the objective as ``batch.extras``.

Collation by the values' type: numbers -> a 1-D tensor (int64 for integers and booleans, float32 otherwise);
equally long lists of numbers or tensors -> a stacked tensor; everything else (strings, None, mixed, ragged lists)
-> a plain list, one entry per sample.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from alignment.errors import ConfigError


def check_extra_columns(columns, key: str = "dataset.extra_columns") -> tuple[str, ...]:
    if columns is None:
        return ()
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise ConfigError(f"{key} must be a list of column names, got {columns!r}")
    names = []
    for name in columns:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key} must hold column names (strings), got {name!r}")
        if name in names:
            raise ConfigError(f"{key}: column {name!r} is listed twice")
        names.append(name)
    return tuple(names)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, complex)


def collate_values(values: list[Any]) -> Any:
    """One extra column over a batch (see the module docstring)."""
    if values and all(_is_number(v) for v in values):
        if all(isinstance(v, (bool, numbers.Integral)) for v in values):
            return torch.tensor([int(v) for v in values], dtype=torch.int64)
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
        return torch.stack(values)
    if values and all(isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v) for v in values) \
            and len({len(v) for v in values}) == 1:
        return torch.tensor([[float(x) for x in v] for v in values], dtype=torch.float32)
    return list(values)


def collate_extras(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{name: collated values}`` from the ``extras`` dict of each item (empty when items carry none)."""
    names = list(items[0].get("extras", {})) if items else []
    return {name: collate_values([item["extras"][name] for item in items]) for name in names}
