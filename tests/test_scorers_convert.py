"""open_clip <-> transformers CLIPModel weight conversion (HPS v2 checkpoints), tested without open_clip.

The round trip proves the mapping is invertible; the functional tests prove it is *right*: a plain-torch forward
written in open_clip's convention (conv1, class token, positional embedding, ln_pre, resblocks with
nn.MultiheadAttention fed ``in_proj_weight``, ln_post, ``@ proj``; and the text tower with a causal mask, ln_final,
argmax-EOT pooling, ``@ text_projection``) on the open_clip-named weights must match HF's CLIPModel on the
converted weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignment.scorers.open_clip_convert import (
    clip_config, hf_to_open_clip, infer_clip_config, load_open_clip_as_hf, load_state_dict_file,
    open_clip_to_hf_clip, vit_h14_config)

TINY = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
            text_width=24, text_layers=2, text_heads=4, context_length=12, vocab_size=60)


def _tiny_model(seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(**TINY)).eval()
    with torch.no_grad():  # non-trivial layer norms and logit scale so that a swapped tensor would show
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "final_layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
        model.logit_scale.fill_(3.0)
    return model


# ----------------------------------------------------------------------------------------------------------------
# open_clip-convention reference forward (independent of transformers)
# ----------------------------------------------------------------------------------------------------------------

def _resblock(x, sd, prefix, heads, attn_mask=None):
    """open_clip ResidualAttentionBlock, sequence-first (L, N, D), GELU MLP."""
    width = x.shape[-1]
    attn = nn.MultiheadAttention(width, heads)
    attn.load_state_dict({"in_proj_weight": sd[prefix + "attn.in_proj_weight"],
                          "in_proj_bias": sd[prefix + "attn.in_proj_bias"],
                          "out_proj.weight": sd[prefix + "attn.out_proj.weight"],
                          "out_proj.bias": sd[prefix + "attn.out_proj.bias"]})
    h = F.layer_norm(x, (width,), sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"], eps=1e-5)
    x = x + attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
    h = F.layer_norm(x, (width,), sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"], eps=1e-5)
    h = F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])
    h = F.gelu(h)
    return x + F.linear(h, sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])


def open_clip_encode_image(sd, pixels, heads, layers):
    width = sd["visual.conv1.weight"].shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)                      # (N, grid², D)
    cls = sd["visual.class_embedding"].view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    x = x.permute(1, 0, 2)                                                       # NLD -> LND
    for i in range(layers):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    x = x.permute(1, 0, 2)
    pooled = F.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return pooled @ sd["visual.proj"]


def open_clip_encode_text(sd, tokens, heads, layers):
    width = sd["token_embedding.weight"].shape[1]
    seq = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:seq]
    mask = torch.full((seq, seq), float("-inf")).triu_(1)
    x = x.permute(1, 0, 2)
    for i in range(layers):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", heads, attn_mask=mask)
    x = x.permute(1, 0, 2)
    x = F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # EOT has the highest id
    return pooled @ sd["text_projection"]


# ----------------------------------------------------------------------------------------------------------------

def test_round_trip_is_identity():
    model = _tiny_model()
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    oc = hf_to_open_clip(hf)
    back = open_clip_to_hf_clip(oc, model.config)
    assert set(back) == set(hf)
    for key, value in hf.items():
        assert torch.equal(back[key], value), key


def test_open_clip_names_and_shapes():
    oc = hf_to_open_clip(_tiny_model().state_dict())
    w, tw, e = TINY["vision_width"], TINY["text_width"], TINY["embed_dim"]
    grid = TINY["image_size"] // TINY["patch_size"]
    expected = {
        "visual.conv1.weight": (w, 3, 8, 8), "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w), "visual.ln_pre.weight": (w,),
        "visual.transformer.resblocks.1.attn.in_proj_weight": (3 * w, w),
        "visual.transformer.resblocks.1.attn.in_proj_bias": (3 * w,),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (w, w),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (4 * w, w),
        "visual.transformer.resblocks.0.mlp.c_proj.weight": (w, 4 * w), "visual.ln_post.bias": (w,),
        "visual.proj": (w, e), "token_embedding.weight": (TINY["vocab_size"], tw),
        "positional_embedding": (TINY["context_length"], tw),
        "transformer.resblocks.1.attn.in_proj_weight": (3 * tw, tw), "transformer.resblocks.0.ln_2.bias": (tw,),
        "ln_final.weight": (tw,), "text_projection": (tw, e), "logit_scale": (),
    }
    for key, shape in expected.items():
        assert tuple(oc[key].shape) == shape, key
    assert not any("q_proj" in k or "layer_norm" in k for k in oc)


def test_vision_tower_matches_open_clip_reference():
    source = _tiny_model(seed=0)
    oc = hf_to_open_clip(source.state_dict())
    converted = load_open_clip_as_hf(oc, clip_config(**TINY))  # a fresh CLIPModel filled from open_clip names
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = open_clip_encode_image(oc, pixels, heads=TINY["vision_heads"], layers=TINY["vision_layers"])
        ours = converted.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_text_tower_matches_open_clip_reference():
    oc = hf_to_open_clip(_tiny_model(seed=0).state_dict())
    converted = load_open_clip_as_hf(oc, clip_config(**TINY))
    eot = TINY["vocab_size"] - 1
    tokens = torch.tensor([[eot - 1, 5, 9, 13, eot, 0, 0, 0],  # open_clip pads with 0 after the EOT
                           [eot - 1, 7, 3, 21, 30, 2, 44, eot]])
    with torch.no_grad():
        ref = open_clip_encode_text(oc, tokens, heads=TINY["text_heads"], layers=TINY["text_layers"])
        ours = converted.get_text_features(input_ids=tokens).pooler_output
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert torch.equal(converted.logit_scale, oc["logit_scale"])


def test_infer_config_from_shapes():
    oc = hf_to_open_clip(_tiny_model().state_dict())
    cfg = infer_clip_config(oc, vision_heads=4, text_heads=4)
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.patch_size, vc.image_size) == (32, 2, 8, 32)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.vocab_size, tc.max_position_embeddings) == (24, 2, 60, 12)
    assert cfg.projection_dim == 16 and vc.intermediate_size == 128 and vc.hidden_act == "gelu"


def test_vit_h14_config_matches_open_clip_shapes():
    """The full-size ViT-H-14 CLIPModel (built on the meta device: no memory) has exactly open_clip's tensors."""
    from transformers import CLIPModel

    cfg = vit_h14_config()
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size, vc.image_size) == (
        1280, 32, 16, 14, 224)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.vocab_size) == (1024, 24, 16, 49408)
    assert cfg.projection_dim == 1024 and vc.hidden_act == tc.hidden_act == "gelu"
    assert tc.eos_token_id == 49407 and tc.max_position_embeddings == 77
    with torch.device("meta"):
        model = CLIPModel(cfg)
    oc = hf_to_open_clip(model.state_dict())
    assert tuple(oc["visual.positional_embedding"].shape) == (257, 1280)
    assert tuple(oc["visual.conv1.weight"].shape) == (1280, 3, 14, 14)
    assert tuple(oc["visual.proj"].shape) == (1280, 1024)
    assert tuple(oc["visual.transformer.resblocks.31.mlp.c_fc.weight"].shape) == (5120, 1280)
    assert tuple(oc["transformer.resblocks.23.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(oc["text_projection"].shape) == (1024, 1024)
    assert tuple(oc["positional_embedding"].shape) == (77, 1024)
    assert "transformer.resblocks.24.ln_1.weight" not in oc
    # and the conversion back checks out against the config
    assert set(open_clip_to_hf_clip(oc, cfg)) == {k for k in model.state_dict() if not k.endswith("position_ids")}


def test_bad_state_dicts_raise_one_line():
    oc = hf_to_open_clip(_tiny_model().state_dict())
    with pytest.raises(ValueError, match="unknown keys visual.head.weight"):
        open_clip_to_hf_clip({**oc, "visual.head.weight": torch.zeros(1)})
    wrong = clip_config(**{**TINY, "vision_layers": 3})
    with pytest.raises(ValueError, match="vision layers") as info:
        open_clip_to_hf_clip(oc, wrong)
    assert "\n" not in str(info.value)
    # open_clip's non-persistent causal mask and a DDP prefix are tolerated
    extra = {"module." + k: v for k, v in {**oc, "attn_mask": torch.zeros(12, 12)}.items()}
    assert set(open_clip_to_hf_clip(extra, clip_config(**TINY))) == set(open_clip_to_hf_clip(oc))


def test_checkpoint_files(tmp_path):
    from safetensors.torch import save_file

    oc = hf_to_open_clip(_tiny_model().state_dict())
    torch.save({"state_dict": {"module." + k: v for k, v in oc.items()}}, tmp_path / "hps.pt")
    save_file({k: v.contiguous() for k, v in oc.items()}, str(tmp_path / "hps.safetensors"))
    for name in ("hps.pt", "hps.safetensors"):
        model = load_open_clip_as_hf(tmp_path / name, clip_config(**TINY))
        assert torch.equal(model.visual_projection.weight, oc["visual.proj"].t())
    assert set(load_state_dict_file(tmp_path / "hps.pt")) == {"module." + k for k in oc}
