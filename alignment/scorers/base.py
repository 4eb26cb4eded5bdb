"""The scorer interface shared by labelling (BalancedDPO, HG-DPO), rewards (DRaFT, Focus-N-Fix) and evaluation.

A scorer maps a batch of images — a float tensor (B, 3, H, W) in [0, 1] — and their prompts to one score per image
(B,). It does its own preprocessing with torch ops (so gradients can flow to the pixels), is loaded once, frozen,
and moved with ``.to(device, dtype)`` like any module. ``differentiable`` says whether ``forward`` may be used as a
reward with gradient; ``score`` is the batched, no-gradient call used for labels and metrics.

Configs (``conf/scorers/*.yaml``) each hold one or more named entries with a ``_target_``; Hydra merges a list of
them into one mapping, so an ensemble is ``scorers=[pickscore,hpsv2,clip,aesthetic]`` and
``build_scorers(cfg.scorers)`` returns ``{"pickscore": PickScore(...), ...}``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignment.errors import ConfigError

# OpenAI CLIP's preprocessing constants (used by PickScore, HPS, CLIP score, aesthetic, the attribute classifier).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_tensor(images) -> torch.Tensor:
    """A (B,3,H,W) float tensor in [0,1], or a list of PIL images (converted to RGB, same size), -> tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        return images
    import numpy as np

    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                    pad_to_square: bool = False, pad_value: float = 1.0) -> torch.Tensor:
    """CLIP's image transform in differentiable torch ops: (optionally pad to a square with ``pad_value`` first),
    resize the shorter side to ``size`` (bicubic, antialiased), centre-crop ``size``², normalise. (HPS has its own
    resize-longer-side-then-pad-black transform in clip_scorers.HPSv2.)"""
    x = images.float()
    if pad_to_square:
        h, w = x.shape[-2:]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=pad_value)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_image_features/get_text_features; older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Scorer(nn.Module):
    """Base class: subclasses implement ``forward(images_0_1, prompts) -> (B,)`` and set ``differentiable``."""

    name: str = "scorer"
    differentiable: bool = True
    #: constructor arguments that name weights (a hub id, a local folder or file): checked before any model loads
    weight_keys: tuple[str, ...] = ()
    #: those of them that have no default and must be given
    required_weight_keys: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()

    def freeze(self) -> "Scorer":
        self.requires_grad_(False)
        self.eval()
        return self

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def check_resolution(cls, resolution, key: str) -> None:
        """Whether this scorer can score square images of side ``resolution`` px (a backbone's samples): nothing,
        or a one-line ConfigError naming ``key`` (the scorer's config key), the scorer and both sizes.

        A class method, so that builders ask it from the config alone, before any model loads (the scorers here
        take no setting that changes what they accept). Default: every size (the CLIP-based scorers resize to their
        224 px input themselves). A scorer with a fixed input grid overrides it (the toy-world scorers)."""
        return None

    @torch.no_grad()
    def score(self, images, prompts: Sequence[str], batch_size: int = 32, **per_image) -> torch.Tensor:
        """Batched scores without gradient; accepts a tensor in [0,1] or a list of PIL images. Returns (B,) float32
        on the CPU. ``per_image`` keyword arguments (e.g. a toxicity judge's ``concepts=``) hold one entry per image
        and reach ``forward`` sliced like the images, a chunk at a time; a None one is left out."""
        images = images_to_tensor(images)
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        per_image = {key: value for key, value in per_image.items() if value is not None}
        for key, value in per_image.items():
            if len(value) != len(prompts):
                raise ValueError(f"{self.name}: {len(prompts)} images but {len(value)} {key}")
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = images[start:start + batch_size].to(self.device, self.dtype)
            extra = {key: value[start:start + batch_size] for key, value in per_image.items()}
            out.append(self(chunk, prompts[start:start + batch_size], **extra).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def check_scorer_weights(node, key: str) -> None:
    """Before any model loads: a scorer's required weights are given and its local weight paths exist (one line
    naming the scorer and the key). Only explicit local paths (absolute, ./, ../, ~) are checked here; a hub id or
    an ``org/repo/file`` hub file is resolved when the scorer loads (``clip_scorers.resolve_file``)."""
    import os
    from pathlib import Path

    from hydra.utils import get_class

    if node is None or "_target_" not in node:
        return
    try:
        target = get_class(str(node._target_))
    except Exception:  # check_keys names a bad _target_
        return
    for name in getattr(target, "required_weight_keys", ()):
        if node.get(name) in (None, ""):
            raise ConfigError(f"{key}.{name}: required — the weights of scorer {key.split('.')[-1]!r} "
                              f"(set {key}.{name}=<path or hub id>)")
    for name in getattr(target, "weight_keys", ()):
        value = node.get(name)
        if not isinstance(value, (str, os.PathLike)):
            continue
        value = str(value)
        if value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}.{name}: {value} does not exist (weights of scorer {key.split('.')[-1]!r})")


def build_scorers(node) -> dict[str, Scorer]:
    """Instantiate every entry of the ``scorers`` config mapping (name -> node with _target_), frozen."""
    import inspect

    from omegaconf import OmegaConf

    from alignment.config import check_keys, instantiate_checked

    scorers = {}
    for name in (node or {}):
        entry = node[name]
        if entry is None or "_target_" not in entry:
            raise ConfigError(f"scorers.{name}: needs a _target_ (see conf/scorers/)")
        target = check_keys(entry, f"scorers.{name}")
        if "key" in inspect.signature(target).parameters and "key" not in entry:
            entry = OmegaConf.create(OmegaConf.to_container(entry))
            entry.key = f"scorers.{name}"  # so load errors name this entry even when it was renamed
        scorer = instantiate_checked(entry, f"scorers.{name}")
        if not isinstance(scorer, Scorer):
            raise ConfigError(f"scorers.{name}: {entry._target_} does not build an alignment Scorer")
        scorer.name = name
        scorers[name] = scorer.freeze()
    return scorers


def scorer_class(node) -> type | None:
    """The class a scorer config entry builds (its ``_target_``), imported but not built, or None when there is no
    ``_target_`` or it does not import (the key checks name a bad ``_target_`` themselves). For the checks that run
    before any model loads (``Scorer.check_resolution``, an objective's ``check_scorer_classes``)."""
    from hydra.utils import get_class

    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        return None
    try:
        return get_class(str(target))
    except Exception:  # noqa: BLE001 - a bad _target_ is reported by check_keys
        return None
