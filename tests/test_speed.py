"""Speed switches change how the UNet runs, not what it computes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from alignment.backbones.tiny import build_tiny_backbone
from alignment.errors import ConfigError
from alignment.training.speed import apply_speed, make_optimizer


def _output(backbone):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backbone.latent_shape, generator=gen)
    cond = backbone.encode_prompt(["a red circle", "a blue square"])
    with torch.no_grad():
        return backbone.unet_forward(x, torch.tensor([10, 600]), cond)


def test_attention_and_memory_format_switches_keep_the_numbers():
    backbone = build_tiny_backbone()
    applied = apply_speed(backbone, {"attention": "eager", "channels_last": False, "compile": False}, "cpu")
    assert applied == {"attention": "eager", "channels_last": False, "compile": False}
    assert all(isinstance(p, AttnProcessor) for p in backbone.unet.attn_processors.values())
    eager = _output(backbone)
    apply_speed(backbone, {"attention": "sdpa", "channels_last": True, "compile": False}, "cpu")
    assert all(isinstance(p, AttnProcessor2_0) for p in backbone.unet.attn_processors.values())
    conv = backbone.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(_output(backbone), eager, atol=1e-5)


def test_auto_means_cuda_only(monkeypatch):
    backbone = build_tiny_backbone()
    assert apply_speed(backbone, {"channels_last": "auto", "compile": "auto"}, "cpu")["channels_last"] is False
    compiled = []
    monkeypatch.setattr(type(backbone.unet), "compile", lambda self, **kw: compiled.append(kw))
    assert apply_speed(backbone, {"channels_last": False, "compile": True}, "cpu")["compile"] is True
    assert compiled == [{"mode": None}]


def test_bad_switch_values_name_their_key():
    backbone = build_tiny_backbone()
    with pytest.raises(ConfigError, match="speed.attention must be one of sdpa, eager, got 'flash'"):
        apply_speed(backbone, {"attention": "flash"}, "cpu")
    with pytest.raises(ConfigError, match="speed.channels_last must be true, false or auto"):
        apply_speed(backbone, {"channels_last": "yes"}, "cpu")


def test_adamw8bit_falls_back_with_a_warning_when_bitsandbytes_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ModuleNotFoundError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.warns(UserWarning, match="adamw8bit: bitsandbytes unavailable"):
        optimizer = make_optimizer("adamw8bit", params, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="method.optimizer.name: 'sgd' is not supported"):
        make_optimizer("sgd", params, lr=1e-3)
