"""Names of torch dtypes in configs (``backbone.dtype``, ``dataset.cache_dtype``, ``scorers.<name>.dtype``)."""

from __future__ import annotations

import torch

from alignment.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name, key: str = "backbone.dtype") -> torch.dtype:
    """``"bf16"``, ``"torch.float16"``, a ``torch.dtype`` ... -> the dtype; anything else is a one-line error."""
    if isinstance(name, torch.dtype):
        return name
    text = str(name).lower().removeprefix("torch.") if isinstance(name, str) else None
    if text not in DTYPES:
        raise ConfigError(f"{key}: unknown dtype {name!r} (choose one of {', '.join(sorted(DTYPES))})")
    return DTYPES[text]
