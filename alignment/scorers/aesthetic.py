"""LAION Aesthetic Predictor v2 (christophschuhmann/improved-aesthetic-predictor), differentiable.

score = MLP(normalize(CLIP ViT-L/14 image embedding)). The MLP is the repository's ``MLP(768).layers``:

    Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1) Linear(64,16) Linear(16,1)

(keys ``layers.{0,2,4,6,7}.{weight,bias}``; the default weights ``sac+logos+ava1-l14-linearMSE.pth`` have no
activations). The ``*-reluMSE.pth`` variants insert a ReLU after each of the first four linears (keys
``layers.{0,3,6,9,11}``); the layout is read off the weight file's keys. Image preprocessing is OpenAI CLIP's
(resize shorter side to 224 bicubic, centre crop, normalise) in torch ops.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignment.errors import ConfigError
from alignment.scorers.base import Scorer, clip_preprocess, pooled
from alignment.dtypes import parse_dtype
from alignment.scorers.clip_scorers import load_pretrained, load_weights

_LINEAR_LAYOUT = (0, 2, 4, 6, 7)
_RELU_LAYOUT = (0, 3, 6, 9, 11)
_WIDTHS = (1024, 128, 64, 16, 1)
_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; ``relu=True`` builds the ``reluMSE`` variant."""

    def __init__(self, input_size: int = 768, relu: bool = False):
        super().__init__()
        dims = (input_size,) + _WIDTHS
        modules: list[nn.Module] = []
        for i in range(len(_WIDTHS)):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(_WIDTHS) - 1 and relu:
                modules.append(nn.ReLU())
            if i < len(_DROPOUTS):
                modules.append(nn.Dropout(_DROPOUTS[i]))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _layout(state_dict) -> tuple[int, ...]:
    indices = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and k.endswith(".weight")})
    return tuple(indices)


class LaionAesthetic(Scorer):
    """LAION Aesthetic v2 score (about 1..10) of each image; the prompt is ignored.

    ``model``: CLIP ViT-L/14 (hub id / folder of a CLIPModel or CLIPVisionModelWithProjection, or an object).
    ``mlp_weights``: the head's ``.pth`` (torch, loaded with ``weights_only=True``) or ``.safetensors`` file, a
    ``org/repo/file`` hub path, or a state dict object.
    """

    name = "aesthetic"
    differentiable = True

    weight_keys = ("model", "mlp_weights")
    required_weight_keys = ("mlp_weights",)

    def __init__(self, model="openai/clip-vit-large-patch14", mlp_weights=None, dtype="float32",
                 local_files_only: bool = False, name: str | None = None):
        super().__init__()
        if name:
            self.name = name
        key = f"scorers.{self.name}"
        torch_dtype = parse_dtype(dtype, f"{key}.dtype")
        if mlp_weights is None:
            raise ConfigError(f"{key}.mlp_weights: required (path to sac+logos+ava1-l14-linearMSE.pth from "
                              "github.com/christophschuhmann/improved-aesthetic-predictor)")
        state = load_weights(mlp_weights, f"{key}.mlp_weights", local_files_only)
        layout = _layout(state)
        if layout not in (_LINEAR_LAYOUT, _RELU_LAYOUT):
            raise ConfigError(f"{key}.mlp_weights: not an aesthetic-predictor MLP (linear layers at {list(layout)}, "
                              f"expected {list(_LINEAR_LAYOUT)} or {list(_RELU_LAYOUT)})")
        from transformers import CLIPVisionModelWithProjection

        vision = load_pretrained(CLIPVisionModelWithProjection, model, f"{key}.model", local_files_only,
                                 dtype=torch_dtype)
        self.vision = vision.to(torch_dtype)
        embed_dim = self._embed_dim()
        input_size = state["layers.0.weight"].shape[1]
        if input_size != embed_dim:
            raise ConfigError(f"{key}.mlp_weights: the MLP takes {input_size}-d embeddings, the CLIP model gives "
                              f"{embed_dim}-d")
        self.mlp = AestheticMLP(input_size, relu=layout == _RELU_LAYOUT)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"{key}.mlp_weights: {str(err).strip().splitlines()[0]}") from None
        self.mlp.to(torch_dtype)
        self.freeze()

    def _config(self):
        config = self.vision.config
        return config.vision_config if hasattr(config, "vision_config") else config

    def _embed_dim(self) -> int:
        config = self.vision.config
        return int(getattr(config, "projection_dim", None) or self._config().projection_dim)

    @property
    def image_size(self) -> int:
        size = self._config().image_size
        return size if isinstance(size, int) else int(size[0])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (B, D) in the model's dtype."""
        pixels = clip_preprocess(images.to(self.device), size=self.image_size).to(self.dtype)
        if hasattr(self.vision, "get_image_features"):  # a full CLIPModel
            feats = pooled(self.vision.get_image_features(pixel_values=pixels))
        else:  # CLIPVisionModelWithProjection
            feats = self.vision(pixel_values=pixels).image_embeds
        return F.normalize(feats.float(), dim=-1).to(self.dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.mlp(self.image_embeds(images)).squeeze(-1).float()
