"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image encoder + BERT-base text encoder with cross-attention to the
image tokens ("med" BERT), the text [CLS] output -> MLP head -> ``(reward - mean) / std``.

The ``image-reward`` package does not import under transformers 5, so the network is rebuilt here from
transformers' BLIP parts, whose math matches the package's (checked against THUDM/ImageReward and salesforce/BLIP):

* ``BlipVisionModel`` == BLIP ``models/vit.py`` (timm ViT): pre-norm blocks, fused ``qkv`` laid out (3, heads,
  head_dim), exact GELU, LayerNorm eps 1e-6, a final LayerNorm over all tokens, CLS token first.
* ``BlipTextModel`` == BLIP ``models/med.py`` ``BertModel``: word + absolute position embeddings (no token types),
  post-norm layers with a cross-attention block whose keys/values read the 1024-d image tokens; called with
  ``is_decoder=False`` (bidirectional self-attention), i.e. med's ``mode='multimodal'``.
* The head is ImageReward's ``MLP(768)``: Linear 768->1024, Dropout .2, 1024->128, Dropout .2, 128->64,
  Dropout .1, 64->16, 16->1 -- no activations (the ReLUs are commented out in the package).

Inputs follow ``ImageReward.score``: the prompt is tokenised by bert-base-uncased (plus BLIP's ``[DEC]``/``[ENC]``
special tokens) padded/truncated to 35 tokens, the first token stays ``[CLS]`` (the package does not swap in
``[ENC]`` in this path); the image goes through Resize(224, bicubic) -> CenterCrop(224) -> CLIP mean/std, done
here with differentiable torch ops (``clip_preprocess``). The package loads ``BLIP_Pretrain(image_size=224,
vit='large')``, so the resolution is 224, not BLIP's 384.

Weights: ``ImageReward.pt`` from the hub repo THUDM/ImageReward is a plain state dict with the package's names
(``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``); :func:`convert_imagereward_state_dict`
maps it to this module's names and :func:`to_imagereward_state_dict` maps back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from alignment.errors import ConfigError
from alignment.scorers.base import CLIP_MEAN, CLIP_STD, Scorer, clip_preprocess

# ImageReward.__init__: self.mean / self.std (THUDM/ImageReward, ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35  # blip.tokenizer(..., padding='max_length', truncation=True, max_length=35)
IMAGE_SIZE = 224  # BLIP_Pretrain(image_size=224, vit='large'); _transform(224)

# create_vit('large', 224): VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16), mlp_ratio 4,
# qkv_bias=True, LayerNorm(eps=1e-6).
VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
# med_config.json (vocab 30524 = bert-base-uncased + [DEC] + [ENC]); encoder_width = the ViT-L width.
TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu",
                     pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None)
MLP_DROPOUTS = (0.2, 0.2, 0.1)

# Keys in ImageReward.pt that the reward does not use: BLIP_Pretrain's ITC projections and the (persistent, in
# the package's transformers version) position-id buffer of the text embeddings.
IGNORED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

# (ImageReward name, our name) for the vision tower; the text encoder and the head keep their names.
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_IR_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_OUR_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(layer_norm1|self_attn\.qkv|self_attn\.projection|layer_norm2|"
                        r"mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_TEXT_KEY = re.compile(r"^(embeddings\.(word_embeddings|position_embeddings)\.weight|"
                       r"embeddings\.LayerNorm\.(weight|bias)|"
                       r"encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)|"
                       r"encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)|"
                       r"encoder\.layer\.\d+\.(intermediate|output)\.dense\.(weight|bias)|"
                       r"encoder\.layer\.\d+\.output\.LayerNorm\.(weight|bias))$")
_MLP_KEY = re.compile(r"^layers\.(0|2|4|6|7)\.(weight|bias)$")


def convert_imagereward_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt names (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) -> the names of
    :class:`ImageRewardModel`. Unused keys (``IGNORED_KEYS``) are dropped; any other key raises ``KeyError``."""
    out = {}
    for key, value in state_dict.items():
        if IGNORED_KEYS.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VIT_TOP:
                out["visual_encoder." + _VIT_TOP[rest]] = value
                continue
            match = _IR_BLOCK.match(rest)
            if match:
                index, part, kind = match.groups()
                out[f"visual_encoder.encoder.layers.{index}.{_VIT_BLOCK[part]}.{kind}"] = value
                continue
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder."):]
            if _TEXT_KEY.match(rest):
                out["text_encoder." + rest] = value
                continue
        elif key.startswith("mlp.") and _MLP_KEY.match(key[len("mlp."):]):
            out[key] = value
            continue
        raise KeyError(key)
    return out


def to_imagereward_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_imagereward_state_dict`: :class:`ImageRewardModel` names -> ImageReward.pt
    names (without the unused ``IGNORED_KEYS``)."""
    vit_top = {ours: theirs for theirs, ours in _VIT_TOP.items()}
    vit_block = {ours: theirs for theirs, ours in _VIT_BLOCK.items()}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("visual_encoder."):
            rest = key[len("visual_encoder."):]
            if rest in vit_top:
                out["blip.visual_encoder." + vit_top[rest]] = value
                continue
            match = _OUR_BLOCK.match(rest)
            if match:
                index, part, kind = match.groups()
                out[f"blip.visual_encoder.blocks.{index}.{vit_block[part]}.{kind}"] = value
                continue
        elif key.startswith("text_encoder.") and _TEXT_KEY.match(key[len("text_encoder."):]):
            out["blip." + key] = value
            continue
        elif key.startswith("mlp.") and _MLP_KEY.match(key[len("mlp."):]):
            out[key] = value
            continue
        raise KeyError(key)
    return out


class RewardHead(nn.Module):
    """ImageReward's ``MLP``: ``layers`` is the same ``nn.Sequential`` (linear layers at 0, 2, 4, 6, 7)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(MLP_DROPOUTS[0]),
            nn.Linear(1024, 128), nn.Dropout(MLP_DROPOUTS[1]),
            nn.Linear(128, 64), nn.Dropout(MLP_DROPOUTS[2]),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        for name, param in self.layers.named_parameters():  # the package's init (only matters untrained)
            if "weight" in name:
                nn.init.normal_(param, mean=0.0, std=1.0 / (input_size + 1))
            else:
                nn.init.zeros_(param)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(nn.Module):
    """The network on already preprocessed inputs: ``forward(pixel_values, input_ids, attention_mask)`` -> the
    normalised reward (B,), float32. ``vision`` / ``text`` override :data:`VISION_DEFAULTS` / :data:`TEXT_DEFAULTS`
    (tests use tiny sizes)."""

    def __init__(self, vision: dict | None = None, text: dict | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vision_cfg = BlipVisionConfig(**{**VISION_DEFAULTS, **(vision or {})})
        # is_decoder=True only makes BlipTextLayer build its cross-attention block; forward runs is_decoder=False.
        text_cfg = BlipTextConfig(**{**TEXT_DEFAULTS, **(text or {}), "encoder_hidden_size": vision_cfg.hidden_size,
                                     "is_decoder": True, "use_cache": False})
        self.image_size = vision_cfg.image_size
        self.visual_encoder = BlipVisionModel(vision_cfg)
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = RewardHead(text_cfg.hidden_size)

    def text_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """``text_output.last_hidden_state[:, 0, :]`` of ``ImageReward.score``."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                is_decoder=False)
        return out.last_hidden_state[:, 0, :]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        reward = self.mlp(self.text_features(pixel_values, input_ids, attention_mask)).squeeze(-1).float()
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _looks_like_hub_id(text: str) -> bool:
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/", "~"))
            and not text.endswith((".pt", ".pth", ".bin", ".safetensors")))


def resolve_checkpoint(checkpoint, key: str, local_files_only: bool = False) -> Path:
    """A path to ImageReward.pt, a folder holding it, or a hub repo id (THUDM/ImageReward) -> the file."""
    if checkpoint is None or str(checkpoint).strip() == "":
        raise ConfigError(f"{key} is required: the path to ImageReward.pt (hub repo THUDM/ImageReward), "
                          f"a folder holding it, or the repo id")
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir():
        path = path / "ImageReward.pt"
    if path.is_file():
        return path
    if _looks_like_hub_id(str(checkpoint)):
        try:
            from huggingface_hub import hf_hub_download

            kwargs = {"local_files_only": bool(local_files_only)}
            return Path(hf_hub_download(str(checkpoint), "ImageReward.pt", **kwargs))
        except Exception as err:  # offline, unknown repo, no such file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{key}: cannot fetch ImageReward.pt from hub repo {checkpoint!r}: {first}") from err
    raise ConfigError(f"{key}: weight file {path} does not exist")


def load_state_dict_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: cannot read {path}: {first}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {path} does not hold a state dict of tensors")
    return state


class ImageReward(Scorer):
    """ImageReward as a differentiable scorer: images (B,3,H,W) in [0,1] + prompts -> normalised reward (B,).

    ``checkpoint``: ImageReward.pt (file, folder holding it, or hub repo id ``THUDM/ImageReward``); ``tokenizer``:
    bert-base-uncased (hub id or folder). ``vision`` / ``text`` override the architecture (tests only)."""

    name = "imagereward"
    differentiable = True
    weight_keys = ("checkpoint", "tokenizer")
    required_weight_keys = ("checkpoint",)

    def __init__(self, checkpoint: str | None = None, tokenizer: str = "bert-base-uncased", dtype: str = "float32",
                 local_files_only: bool = False, max_length: int = MAX_LENGTH,
                 vision: dict | None = None, text: dict | None = None, key: str = "scorers.imagereward"):
        super().__init__()
        from alignment.dtypes import parse_dtype

        weight_dtype = parse_dtype(dtype, f"{key}.dtype")
        path = resolve_checkpoint(checkpoint, f"{key}.checkpoint", local_files_only)
        self.tokenizer = load_blip_tokenizer(tokenizer, f"{key}.tokenizer", local_files_only)
        self.max_length = int(max_length)
        state = load_state_dict_file(path, f"{key}.checkpoint")
        try:
            converted = convert_imagereward_state_dict(state)
        except KeyError as err:
            raise ConfigError(f"{key}.checkpoint: {path} has key {err.args[0]!r}, which is not an ImageReward "
                              f"weight") from None
        del state
        self.model = ImageRewardModel(vision=vision, text=text)
        expected = self.model.state_dict()
        missing = [name for name in expected if name not in converted]
        if missing:
            raise ConfigError(f"{key}.checkpoint: {path} lacks {_their_name(missing[0])!r} "
                              f"({len(missing)} missing weights)")
        for name, tensor in converted.items():
            if tensor.shape != expected[name].shape:
                raise ConfigError(f"{key}.checkpoint: {_their_name(name)!r} in {path} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
        self.model.load_state_dict(converted, strict=True)
        vocab = len(self.tokenizer)
        if vocab > self.model.text_encoder.config.vocab_size:
            raise ConfigError(f"{key}.tokenizer: {tokenizer!r} has {vocab} tokens, more than the text encoder's "
                              f"{self.model.text_encoder.config.vocab_size}")
        self.model.to(weight_dtype)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize(224, bicubic) -> CenterCrop(224) -> CLIP normalisation, as ImageReward's ``_transform``."""
        return clip_preprocess(images, size=self.image_size, mean=CLIP_MEAN, std=CLIP_STD).to(self.dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        input_ids, attention_mask = self.tokenize(prompts)
        return self.model(self.preprocess(images), input_ids, attention_mask)


def _their_name(our_name: str) -> str:
    try:
        return next(iter(to_imagereward_state_dict({our_name: None})))
    except KeyError:
        return our_name


def load_blip_tokenizer(source: str, key: str, local_files_only: bool = False):
    """bert-base-uncased plus BLIP's ``init_tokenizer`` additions: bos ``[DEC]`` and the extra special ``[ENC]``."""
    from transformers import AutoTokenizer

    kwargs = {"local_files_only": bool(local_files_only)}
    path = Path(str(source)).expanduser()
    if str(source).startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise ConfigError(f"{key}: folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(source), **kwargs)
    except Exception as err:  # offline / unknown id / unreadable folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: cannot load tokenizer {source!r}: {first}") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
