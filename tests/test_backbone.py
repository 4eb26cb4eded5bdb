"""The backbone interface: real CLIP tokenizer offline, tiny stack, the sd15 loading path, diffusion maths."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment.backbones.clip_vocab import build_clip_tokenizer
from alignment.backbones.stable_diffusion import StableDiffusionBackbone
from alignment.backbones.tiny import build_tiny_backbone
from alignment.errors import ConfigError
from tests.conftest import REPO


def test_clip_tokenizer_reproduces_sd_token_ids():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    # ids of SD 1.5's CLIP tokenizer for this prompt (openai/clip-vit-large-patch14)
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    padded = tokenizer("x", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tiny_backbone_is_deterministic_and_sd_shaped():
    a, b = build_tiny_backbone(seed=0), build_tiny_backbone(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    assert type(a.unet).__name__ == "UNet2DConditionModel" and type(a.vae).__name__ == "AutoencoderKL"
    assert type(a.text_encoder).__name__ == "CLIPTextModel"
    assert a.latent_shape == (4, 16, 16)
    cond = a.encode_prompt(["a red circle", ""])
    assert cond["encoder_hidden_states"].shape == (2, 77, 32)
    z = a.encode_images(torch.zeros(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 16, 16)
    assert a.decode_latents(z).shape == (2, 3, 32, 32)


def test_add_noise_matches_diffusers_scheduler():
    backbone = build_tiny_backbone()
    z0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 400, 999])
    assert torch.allclose(backbone.add_noise(z0, noise, t), backbone.noise_scheduler.add_noise(z0, noise, t),
                          atol=1e-6)
    assert torch.equal(backbone.training_target(z0, noise, t), noise)


def test_v_prediction_target_comes_from_the_scheduler():
    backbone = build_tiny_backbone(prediction_type="v_prediction")
    z0, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    expected = backbone.noise_scheduler.get_velocity(z0, noise, t)
    assert torch.allclose(backbone.training_target(z0, noise, t), expected, atol=1e-6)


def test_sd15_config_loads_a_diffusers_folder(tmp_path):
    tiny = build_tiny_backbone(seed=3)
    tiny.save_pretrained(tmp_path / "tiny_sd")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "tiny_sd" / sub).is_dir()
    assert list((tmp_path / "tiny_sd" / "unet").glob("*.safetensors"))

    node = OmegaConf.load(REPO / "conf" / "backbone" / "sd15.yaml")
    node.pretrained_model_name_or_path = str(tmp_path / "tiny_sd")
    node.resolution = 32
    loaded = instantiate(node)
    assert isinstance(loaded, StableDiffusionBackbone) and loaded.name == "sd15"
    assert loaded.prediction_type == "epsilon"
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        cond = tiny.encode_prompt(["a blue square"])
        assert torch.allclose(loaded.encode_prompt(["a blue square"])["encoder_hidden_states"],
                              cond["encoder_hidden_states"], atol=1e-6)
        assert torch.allclose(loaded.unet_forward(x, t, cond), tiny.unet_forward(x, t, cond), atol=1e-6)


def test_sd15_bad_folder_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone\.pretrained_model_name_or_path: folder .*missing.* does not exist"):
        StableDiffusionBackbone.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"lacks the diffusers subfolder\(s\) vae, text_encoder, tokenizer"):
        StableDiffusionBackbone.from_pretrained(str(tmp_path / "half"))


def test_unknown_hub_id_offline_is_one_line_config_error():
    with pytest.raises(ConfigError, match=r"backbone\.pretrained_model_name_or_path: cannot load 'nobody/no-such-model'") as info:
        StableDiffusionBackbone.from_pretrained("nobody/no-such-model")
    assert "\n" not in str(info.value)
