"""CLIP-backed scorers: PickScore, HPS v2 / v2.1, CLIP score, and the CLIP zero-shot attribute classifier.

All of them hold a ``transformers.CLIPModel`` (frozen) and a CLIP tokenizer, preprocess images in torch ops
(``clip_preprocess``: differentiable, no numpy round-trip) and compare L2-normalised image and text embeddings:

* ``PickScore``  (Kirstain et al. 2023, yuvalkirstain/PickScore_v1, CLIP-H): ``logit_scale.exp() * cos``.
* ``HPSv2``      (Wu et al. 2023; xswu/HPSv2 ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``): an open_clip
  ViT-H-14 fine-tune, converted to a CLIPModel by ``open_clip_convert``; score = ``cos`` (no logit scale).
  Images are resized so the longer side is 224 and padded to a square with black, as HPS's
  ``ResizeMaxSize(224, fill=0)`` (its ``light_augmentation`` validation transform) does.
* ``ClipScore``: ``mode: metric`` -> ``100 * max(cos, 0)`` per image (torchmetrics' CLIPScore formula, which cannot
  run on transformers 5); ``mode: cosine`` -> the raw cosine (labels / rewards; no ties from clamping).
* ``ClipAttributeClassifier``: LiVO's zero-shot classifier (texts ``prompt + ", " + attribute``, softmax over
  ``logit_scale.exp() * cos``); ``classify`` returns per-class probabilities, ``forward`` the probability of
  ``target``.

Models come from a hub id or a local folder (``model``), or are passed in as objects (tests build tiny random
CLIPs); a missing path or an id that cannot be loaded is a one-line ``ConfigError`` naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignment.dtypes import parse_dtype
from alignment.errors import ConfigError
from alignment.scorers.base import Scorer, clip_preprocess, images_to_tensor, pooled, CLIP_MEAN, CLIP_STD

# The project's offline copy of the CLIP BPE (same vocabulary as OpenAI CLIP / open_clip's SimpleTokenizer).
OFFLINE_BPE = "clip_bpe"

# ---------------------------------------------------------------------------------------------------------------
# Loading helpers (shared with aesthetic.py and nsfw.py)
# ---------------------------------------------------------------------------------------------------------------

def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _looks_like_path(value: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper, a file name) is a path."""
    return (value.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(value) or value.count("/") > 1
            or Path(value).suffix.lower() in {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json"})


def load_pretrained(cls, source, key: str, local_files_only: bool = False, **kwargs):
    """``cls.from_pretrained(source)`` from an existing local folder or a hub id; one-line ConfigError naming
    ``key`` when the folder does not exist or the id cannot be loaded (offline and not cached, wrong type...).
    An already built module (tests pass tiny random ones) is returned as it is."""
    if isinstance(source, nn.Module):
        return source
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ConfigError(f"{key}: required (a hub id or a local folder)")
    source = str(source)
    local = Path(source).expanduser()
    if not local.exists() and _looks_like_path(source):
        raise ConfigError(f"{key}: {source} does not exist")
    target = str(local) if local.exists() else source
    try:
        return cls.from_pretrained(target, local_files_only=local_files_only, **kwargs)
    except Exception as err:  # OSError (not cached / offline), ValueError (wrong model type), ...
        where = "from the folder" if local.exists() else "from the hub or the local cache"
        raise ConfigError(f"{key}: cannot load {source!r} {where} ({_first_line(err)})") from None


def resolve_file(value, key: str, local_files_only: bool = False) -> Path:
    """A weights file: an existing local path, or ``org/repo/path/in/repo`` fetched with ``hf_hub_download``
    (cache only when offline). One-line ConfigError naming ``key`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{key}: required (path to the weights file)")
    value = str(value)
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{key}: {value} is not a file")
    parts = value.split("/")
    if not value.startswith(("/", ".", "~")) and len(parts) >= 3 and all(parts):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=local_files_only))
        except Exception as err:
            raise ConfigError(f"{key}: {value} does not exist locally and cannot be fetched from the hub "
                              f"({_first_line(err)})") from None
    raise ConfigError(f"{key}: {value} does not exist")


def load_weights(value, key: str, local_files_only: bool = False) -> dict[str, torch.Tensor]:
    """A tensor state dict from a path / hub file (see ``resolve_file``), or a mapping passed as is."""
    if isinstance(value, Mapping):
        return dict(value)
    from alignment.scorers.open_clip_convert import load_state_dict_file

    path = resolve_file(value, key, local_files_only)
    try:
        return load_state_dict_file(path)
    except Exception as err:
        raise ConfigError(f"{key}: cannot read {value} as a state dict ({_first_line(err)})") from None


def load_clip_tokenizer(source, key: str, local_files_only: bool = False, max_vocab: int | None = None):
    """A CLIP tokenizer: an object (used as is), ``"clip_bpe"`` (the project's offline CLIP BPE), or a hub id /
    local folder holding tokenizer files."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source
    if source is None:
        raise ConfigError(f"{key}: required (a hub id or folder with CLIP tokenizer files, or {OFFLINE_BPE})")
    if str(source) == OFFLINE_BPE:
        from alignment.backbones.clip_vocab import build_clip_tokenizer

        try:
            return build_clip_tokenizer()
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
    from transformers import CLIPTokenizer

    tokenizer = load_pretrained(CLIPTokenizer, source, key, local_files_only)
    # transformers 5 returns an empty tokenizer (special tokens only) when no vocabulary file is found.
    if len(tokenizer) < 256:
        raise ConfigError(f"{key}: no CLIP tokenizer files (vocab.json/merges.txt or tokenizer.json) in {source!r}")
    if max_vocab is not None and len(tokenizer) > max_vocab:
        raise ConfigError(f"{key}: tokenizer {source!r} has {len(tokenizer)} tokens, the text encoder only {max_vocab}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Shared CLIP scorer
# ---------------------------------------------------------------------------------------------------------------

class ClipBackedScorer(Scorer):
    """A frozen ``transformers.CLIPModel`` + CLIP tokenizer with differentiable torch preprocessing.

    ``model``: hub id, local folder or a ``CLIPModel`` object. ``tokenizer``: hub id / folder / object /
    ``"clip_bpe"``; default: ``processor`` if given (PickScore's tokenizer lives in the CLIP-H repo), else ``model``.
    ``dtype``: float32 | float16 | bfloat16 (the weights' dtype; scores are computed in float32 from the
    embeddings). ``name``: the config entry's name, used in error messages (``scorers.<name>.model``).
    """

    name = "clip"
    pad_to_square = False
    weight_keys = ("model", "processor", "tokenizer")

    def __init__(self, model=None, processor=None, tokenizer=None, dtype="float32", local_files_only: bool = False,
                 name: str | None = None):
        super().__init__()
        from transformers import CLIPModel

        if name:
            self.name = name
        key = f"scorers.{self.name}"
        torch_dtype = parse_dtype(dtype, f"{key}.dtype")
        clip = load_pretrained(CLIPModel, model, f"{key}.model", local_files_only, dtype=torch_dtype)
        if not (hasattr(clip, "get_image_features") and hasattr(clip, "get_text_features")):
            raise ConfigError(f"{key}.model: {type(clip).__name__} is not a CLIP model (needs image and text towers)")
        self.clip = clip.to(torch_dtype)
        tok_source = tokenizer if tokenizer is not None else (processor if processor is not None else model)
        tok_key = f"{key}.tokenizer" if tokenizer is not None else (f"{key}.processor" if processor is not None
                                                                     else f"{key}.model")
        if isinstance(tok_source, nn.Module):
            raise ConfigError(f"{key}.tokenizer: required when the model is passed as an object")
        self.tokenizer = load_clip_tokenizer(tok_source, tok_key, local_files_only,
                                             max_vocab=self.clip.config.text_config.vocab_size)
        self.freeze()

    # -- configuration read off the model ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        size = self.clip.config.vision_config.image_size
        return size if isinstance(size, int) else int(size[0])

    @property
    def max_text_length(self) -> int:
        return min(int(self.tokenizer.model_max_length), int(self.clip.config.text_config.max_position_embeddings))

    # -- building blocks ------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> normalised CLIP pixels (B,3,S,S) in the model's dtype, differentiably."""
        pixels = clip_preprocess(images.to(self.device), size=self.image_size, pad_to_square=self.pad_to_square)
        return pixels.to(self.dtype)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D), float32."""
        feats = pooled(self.clip.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(feats.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), float32."""
        feats = pooled(self.clip.get_text_features(**self.tokenize(prompts)))
        return F.normalize(feats.float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image cosine between image i and prompt i, (B,) float32; text encoded once per unique prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        text = self.text_embeds(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=text.device)
        return (self.image_embeds(images) * text[index]).sum(-1)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.float().exp()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


class PickScore(ClipBackedScorer):
    """PickScore v1: ``logit_scale.exp() * cos(image, prompt)`` (yuvalkirstain/PickScore_v1, CLIP-H; the
    tokenizer / processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)."""

    name = "pickscore"

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 tokenizer=None, dtype="float32", local_files_only: bool = False, name: str | None = None):
        super().__init__(model=model, processor=processor, tokenizer=tokenizer, dtype=dtype,
                         local_files_only=local_files_only, name=name)

    def forward(self, images, prompts):
        return self.logit_scale() * self.cosine(images, prompts)


class HPSv2(ClipBackedScorer):
    """Human Preference Score v2 / v2.1: cosine of an open_clip ViT-H-14 fine-tune, loaded into a CLIPModel.

    ``checkpoint``: the HPS file (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``): a local path, or
    ``xswu/HPSv2/<file>`` fetched from the hub cache; a state dict object is accepted too. ``architecture``: None
    for ViT-H-14, or a dict of ``open_clip_convert.clip_config`` arguments overriding it, or a ``CLIPConfig``.
    ``tokenizer``: the CLIP BPE (default ``clip_bpe``, the project's offline copy; open_clip uses the same
    vocabulary). ``pad_value``: colour of the square padding (HPS: 0 = black, before normalisation).
    """

    name = "hpsv2"
    weight_keys = ("checkpoint", "tokenizer")
    required_weight_keys = ("checkpoint",)

    def __init__(self, checkpoint=None, tokenizer=OFFLINE_BPE, architecture=None, dtype="float32",
                 local_files_only: bool = False, pad_value: float = 0.0, name: str | None = None):
        from transformers import CLIPConfig

        from alignment.scorers.open_clip_convert import (
            empty_clip_model, open_clip_to_hf_clip, strip_prefix, vit_h14_config)

        key = f"scorers.{name or self.name}"
        if isinstance(architecture, CLIPConfig):
            config = architecture
        elif architecture is None or isinstance(architecture, Mapping):
            try:
                config = vit_h14_config(**dict(architecture or {}))
            except TypeError as err:
                raise ConfigError(f"{key}.architecture: {_first_line(err)}") from None
        else:
            raise ConfigError(f"{key}.architecture: expected a mapping of CLIP dimensions, got {architecture!r}")
        state = strip_prefix(load_weights(checkpoint, f"{key}.checkpoint", local_files_only))
        try:
            hf_state = open_clip_to_hf_clip(state, config)
        except ValueError as err:
            raise ConfigError(f"{key}.checkpoint: {_first_line(err)}") from None
        clip = empty_clip_model(config)
        missing, unexpected = clip.load_state_dict(hf_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ConfigError(f"{key}.checkpoint: does not fill a CLIPModel (missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]})")
        super().__init__(model=clip, tokenizer=tokenizer, dtype=dtype, local_files_only=local_files_only, name=name)
        self.pad_value = float(pad_value)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """HPS's validation transform in torch ops: resize the longer side to S (bicubic, antialiased), pad to
        S x S centred with ``pad_value``, normalise with CLIP's mean/std."""
        x = images.to(self.device).float()
        size = self.image_size
        h, w = x.shape[-2:]
        scale = size / max(h, w)
        new_h, new_w = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=self.pad_value)
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def forward(self, images, prompts):
        return self.cosine(images, prompts)


class ClipScore(ClipBackedScorer):
    """CLIP score. ``mode: metric``: ``100 * max(cos, 0)`` per image (Hessel et al.; torchmetrics' formula);
    ``mode: cosine``: the raw cosine, for labels and rewards (no false ties from the clamp, no x100)."""

    name = "clip"

    def __init__(self, model="openai/clip-vit-large-patch14", tokenizer=None, mode: str = "metric",
                 dtype="float32", local_files_only: bool = False, name: str | None = None):
        if mode not in ("metric", "cosine"):
            raise ConfigError(f"scorers.{name or self.name}.mode must be metric or cosine, got {mode!r}")
        super().__init__(model=model, tokenizer=tokenizer, dtype=dtype, local_files_only=local_files_only, name=name)
        self.mode = mode

    def forward(self, images, prompts):
        cos = self.cosine(images, prompts)
        return 100.0 * cos.clamp(min=0) if self.mode == "metric" else cos


ATTRIBUTE_SETS: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female"),
    "race": ("white", "black", "asian", "indian", "latino"),
}


def resolve_attributes(attributes, key: str = "attributes") -> tuple[str, ...]:
    """A named set (gender, race) or an explicit list of attribute words."""
    if isinstance(attributes, str):
        if attributes not in ATTRIBUTE_SETS:
            raise ConfigError(f"{key}: unknown attribute set {attributes!r} ({', '.join(ATTRIBUTE_SETS)} or a list)")
        return ATTRIBUTE_SETS[attributes]
    values = tuple(str(a) for a in (attributes or ()))
    if len(values) < 2:
        raise ConfigError(f"{key}: needs at least two attributes, got {list(values)}")
    return values


class ClipAttributeClassifier(ClipBackedScorer):
    """CLIP zero-shot attribute classifier (LiVO's bias metric and data builder).

    For image i with prompt p_i and attributes a_1..a_A, the class texts are ``p_i + ", " + a_k`` and
    ``P(a_k | image) = softmax_k(logit_scale.exp() * cos(image, text_k))`` (LiVO evaluation/eval_bias.py, with
    openai/clip-vit-large-patch14). As a Scorer, ``forward`` returns ``P(target)`` (default: the first attribute).
    """

    name = "attributes"

    def __init__(self, model="openai/clip-vit-large-patch14", tokenizer=None, attributes="gender",
                 target: str | None = None, dtype="float32", local_files_only: bool = False, name: str | None = None):
        key = f"scorers.{name or self.name}"
        attrs = resolve_attributes(attributes, f"{key}.attributes")
        if target is not None and target not in attrs:
            raise ConfigError(f"{key}.target: {target!r} is not one of the attributes {list(attrs)}")
        super().__init__(model=model, tokenizer=tokenizer, dtype=dtype, local_files_only=local_files_only, name=name)
        self.attributes = attrs
        self.target = target if target is not None else attrs[0]

    def logits(self, images: torch.Tensor, prompts, attributes=None) -> torch.Tensor:
        """(B, A) zero-shot logits ``logit_scale.exp() * cos``; differentiable with respect to the images."""
        attrs = resolve_attributes(attributes) if attributes is not None else self.attributes
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        texts = [f"{p}, {a}" for p in unique for a in attrs]
        text = self.text_embeds(texts).view(len(unique), len(attrs), -1)
        index = torch.tensor([unique.index(p) for p in prompts], device=text.device)
        cos = torch.einsum("bd,bad->ba", self.image_embeds(images), text[index])
        return self.logit_scale() * cos

    def classify(self, images, prompts, attributes=None) -> torch.Tensor:
        """Per-class probabilities (B, A) for a tensor in [0,1] or a list of PIL images; rows sum to 1. Call under
        ``torch.no_grad()`` for metrics; it keeps the graph otherwise."""
        images = images_to_tensor(images).to(self.device)
        return self.logits(images, prompts, attributes).softmax(dim=-1)

    def forward(self, images, prompts):
        return self.classify(images, prompts)[:, self.attributes.index(self.target)]
