"""open_clip ViT checkpoints (HPS v2 / v2.1) as ``transformers.CLIPModel`` weights, without importing open_clip.

open_clip cannot be imported here (it needs torchvision), so HPS checkpoints, which are open_clip ``ViT-H-14``
state dicts, are renamed into the parameter names of transformers' ``CLIPModel`` and loaded into a CLIPModel
built from a ViT-H-14-shaped ``CLIPConfig``. Key names follow open_clip's ``CLIP`` / ``VisionTransformer`` /
``ResidualAttentionBlock`` (src/open_clip/model.py, transformer.py):

=====================================================  ===========================================================
open_clip                                              transformers CLIPModel
=====================================================  ===========================================================
visual.conv1.weight                                    vision_model.embeddings.patch_embedding.weight
visual.class_embedding                                 vision_model.embeddings.class_embedding
visual.positional_embedding                            vision_model.embeddings.position_embedding.weight
visual.ln_pre.{weight,bias}                            vision_model.pre_layrnorm.*
visual.transformer.resblocks.N.*                       vision_model.encoder.layers.N.* (see block table)
visual.ln_post.*                                       vision_model.post_layernorm.*
visual.proj  (width, embed), used as ``x @ proj``      visual_projection.weight = proj.T
token_embedding.weight                                 text_model.embeddings.token_embedding.weight
positional_embedding                                   text_model.embeddings.position_embedding.weight
transformer.resblocks.N.*                              text_model.encoder.layers.N.*
ln_final.*                                             text_model.final_layer_norm.*
text_projection (width, embed), used as ``x @ proj``   text_projection.weight = text_projection.T
logit_scale                                            logit_scale
=====================================================  ===========================================================

Block: ln_1 -> layer_norm1, attn.in_proj_weight/bias (rows [q; k; v]) -> self_attn.{q,k,v}_proj,
attn.out_proj -> self_attn.out_proj, ln_2 -> layer_norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2.

The ViT-H-14 shape (open_clip model_configs/ViT-H-14.json): embed 1024; vision width 1280, 32 layers, head width
80 (16 heads), patch 14, 224 px; text width 1024, 24 layers, 16 heads, context 77, vocab 49408; nn.GELU (exact),
not QuickGELU (no ``quick_gelu`` in the config; HPS builds it with ``force_quick_gelu=False``); LayerNorm eps 1e-5.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

# Buffers / keys open_clip state dicts may carry that have no counterpart (the causal mask is rebuilt by HF).
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|.*\.attn_mask|.*position_ids)$")

_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}

_TOP_MAP = {  # open_clip -> HF, plain renames (no reshaping)
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TRANSPOSED_INV = {v: k for k, v in _TRANSPOSED.items()}

_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))


def vit_h14_config(**overrides):
    """The ``transformers.CLIPConfig`` of open_clip's ViT-H-14 (the architecture of HPS v2/v2.1 and PickScore)."""
    return clip_config(**{**dict(
        embed_dim=1024, image_size=224, patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16,
        text_width=1024, text_layers=24, text_heads=16, context_length=77, vocab_size=49408), **overrides})


def clip_config(embed_dim: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
                vision_heads: int, text_width: int, text_layers: int, text_heads: int, context_length: int = 77,
                vocab_size: int = 49408, mlp_ratio: float = 4.0, hidden_act: str = "gelu",
                layer_norm_eps: float = 1e-5, logit_scale_init_value: float = 2.6592, eos_token_id: int | None = None,
                bos_token_id: int | None = None, pad_token_id: int = 1):
    """A ``CLIPConfig`` from open_clip-style dimensions. The CLIP BPE's end/start-of-text ids (49407/49406) are
    used when the vocabulary is the real one; a smaller test vocabulary uses its last two ids."""
    from transformers import CLIPConfig

    eos = eos_token_id if eos_token_id is not None else vocab_size - 1
    bos = bos_token_id if bos_token_id is not None else vocab_size - 2
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=int(text_width * mlp_ratio),
                         num_hidden_layers=text_layers, num_attention_heads=text_heads,
                         max_position_embeddings=context_length, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                         eos_token_id=eos, bos_token_id=bos, pad_token_id=min(pad_token_id, vocab_size - 1),
                         projection_dim=embed_dim),
        vision_config=dict(hidden_size=vision_width, intermediate_size=int(vision_width * mlp_ratio),
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
                           patch_size=patch_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                           projection_dim=embed_dim),
        projection_dim=embed_dim, logit_scale_init_value=logit_scale_init_value)


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_clip_config(state_dict: Mapping[str, torch.Tensor], vision_heads: int | None = None,
                      text_heads: int | None = None, hidden_act: str = "gelu"):
    """Read the dimensions of an open_clip ViT state dict off its tensor shapes. Head counts are not stored in the
    weights: by default ``width // 80`` for the vision tower when that divides (open_clip's ViT-H/g head width),
    else ``width // 64``, and ``width // 64`` for text (open_clip's defaults)."""
    sd = strip_prefix(state_dict)
    conv = sd["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width = sd["token_embedding.weight"].shape[1]
    if vision_heads is None:
        vision_heads = vision_width // 80 if vision_width % 80 == 0 and vision_width >= 1280 else max(
            1, vision_width // 64)
    if text_heads is None:
        text_heads = max(1, text_width // 64)
    mlp_width = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return clip_config(
        embed_dim=sd["visual.proj"].shape[1], image_size=grid * patch, patch_size=patch, vision_width=vision_width,
        vision_layers=_count_layers(sd, "visual.transformer.resblocks."), vision_heads=vision_heads,
        text_width=text_width, text_layers=_count_layers(sd, "transformer.resblocks."), text_heads=text_heads,
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        mlp_ratio=mlp_width / vision_width, hidden_act=hidden_act)


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP ``module.`` prefix (HPS training checkpoints carry one)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def open_clip_to_hf_clip(state_dict: Mapping[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) an open_clip ViT CLIP state dict into ``transformers.CLIPModel`` names.

    ``config`` (a ``CLIPConfig``), when given, is checked against the weights: layer counts and widths must agree.
    Raises ``ValueError`` (one line) for keys the mapping does not know or for a shape mismatch."""
    sd = strip_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if _IGNORED.match(key):
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        for oc_prefix, hf_prefix in _TOWERS:
            match = re.match(re.escape(oc_prefix) + r"(\d+)\.(.+)$", key)
            if match:
                layer, rest = match.groups()
                base = f"{hf_prefix}{layer}."
                if rest in _BLOCK_MAP:
                    out[base + _BLOCK_MAP[rest]] = value
                elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                    kind = rest.rsplit("_", 1)[1]  # weight | bias
                    q, k, v = value.chunk(3, dim=0)
                    out[base + f"self_attn.q_proj.{kind}"] = q.contiguous()
                    out[base + f"self_attn.k_proj.{kind}"] = k.contiguous()
                    out[base + f"self_attn.v_proj.{kind}"] = v.contiguous()
                else:
                    unknown.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ValueError(f"not an open_clip ViT CLIP state dict: unknown keys {', '.join(unknown[:3])}{more}")
    if config is not None:
        _check_against_config(out, config)
    return out


def _check_against_config(hf_sd: Mapping[str, torch.Tensor], config) -> None:
    vc, tc = config.vision_config, config.text_config
    checks = [
        ("vision layers", _count_layers(hf_sd, "vision_model.encoder.layers."), vc.num_hidden_layers),
        ("text layers", _count_layers(hf_sd, "text_model.encoder.layers."), tc.num_hidden_layers),
    ]
    shapes = [
        ("vision_model.embeddings.patch_embedding.weight",
         (vc.hidden_size, vc.num_channels, vc.patch_size, vc.patch_size)),
        ("vision_model.embeddings.position_embedding.weight",
         ((vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)),
        ("visual_projection.weight", (config.projection_dim, vc.hidden_size)),
        ("text_model.embeddings.token_embedding.weight", (tc.vocab_size, tc.hidden_size)),
        ("text_model.embeddings.position_embedding.weight", (tc.max_position_embeddings, tc.hidden_size)),
        ("text_projection.weight", (config.projection_dim, tc.hidden_size)),
    ]
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"checkpoint has {got} {name}, the CLIPConfig expects {want}")
    for key, want in shapes:
        if key not in hf_sd:
            raise ValueError(f"checkpoint lacks the tensor for {key}")
        if tuple(hf_sd[key].shape) != tuple(want):
            raise ValueError(f"{key}: checkpoint shape {tuple(hf_sd[key].shape)}, CLIPConfig expects {tuple(want)}")


def hf_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_hf_clip` (q/k/v concatenated into ``in_proj``, projections transposed)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP_MAP_INV:
            out[_TOP_MAP_INV[key]] = value
            continue
        if key in _TRANSPOSED_INV:
            out[_TRANSPOSED_INV[key]] = value.t().contiguous()
            continue
        for oc_prefix, hf_prefix in _TOWERS:
            match = re.match(re.escape(hf_prefix) + r"(\d+)\.(.+)$", key)
            if match:
                layer, rest = match.groups()
                base = f"{oc_prefix}{layer}."
                if rest in _BLOCK_MAP_INV:
                    out[base + _BLOCK_MAP_INV[rest]] = value
                elif (qkv := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)):
                    which, kind = qkv.groups()
                    pending.setdefault(base + f"attn.in_proj_{kind}", {})[which] = value
                else:
                    raise ValueError(f"unknown CLIPModel key {key}")
                break
        else:
            raise ValueError(f"unknown CLIPModel key {key}")
    for key, parts in pending.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from ``.safetensors`` or a torch pickle (``weights_only=True``: no code runs). A
    checkpoint wrapping it as ``{"state_dict": ...}`` (HPS) or ``{"model": ...}`` is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("does not hold a tensor state dict")
    return dict(obj)


def empty_clip_model(config):
    """A ``CLIPModel`` whose weights are about to be overwritten: skip the random initialisation (seconds for
    ViT-H) where transformers offers that; callers must load every tensor (strictly)."""
    from contextlib import nullcontext

    from transformers import CLIPModel

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = nullcontext
    with no_init_weights():
        return CLIPModel(config)


def load_open_clip_as_hf(path_or_state_dict, config=None):
    """Build a ``transformers.CLIPModel`` from an open_clip checkpoint (path or state dict). ``config``: a
    ``CLIPConfig`` (default: inferred from the tensor shapes, with open_clip's head widths)."""
    sd = path_or_state_dict if isinstance(path_or_state_dict, Mapping) else load_state_dict_file(path_or_state_dict)
    sd = strip_prefix(sd)
    config = config if config is not None else infer_clip_config(sd)
    hf_sd = open_clip_to_hf_clip(sd, config)
    model = empty_clip_model(config)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fill the CLIPModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
