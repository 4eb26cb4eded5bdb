"""SD 1.5 / 2.1 / XL: real configs (sizes on the meta device), scaled-down copies through the whole code path."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment.backbones.architectures import ARCHITECTURES, build_random_backbone
from alignment.backbones.sdxl import StableDiffusionXLBackbone
from alignment.backbones.stable_diffusion import StableDiffusionBackbone
from alignment.objectives.base import PairBatch
from alignment.objectives.dpo import DiffusionDPO
from alignment.training.lora import add_lora
from tests.conftest import REPO

# Parameter counts of the published UNets (diffusion_pytorch_model.safetensors of each model).
UNET_PARAMETERS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_real_unet_configs_have_the_published_sizes(arch):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[arch]["unet"])
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMETERS[arch]


def test_real_sdxl_text_towers_on_meta():
    backbone = build_random_backbone("sdxl", scale="full", device="meta")
    assert backbone.text_encoder.config.hidden_size + backbone.text_encoder_2.config.hidden_size == 2048
    assert backbone.unet.config.cross_attention_dim == 2048
    assert backbone.unet.config.projection_class_embeddings_input_dim == 1280 + 6 * 256
    assert backbone.latent_shape == (4, 128, 128)


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def small(request):
    return request.param, build_random_backbone(request.param, scale="small")


def test_conditioning_shapes(small):
    arch, backbone = small
    cond = backbone.encode_prompt(["a cat", "a dog on a sofa"])
    hidden = cond["encoder_hidden_states"]
    assert hidden.shape[:2] == (2, 77) and hidden.shape[2] == backbone.unet.config.cross_attention_dim
    if arch == "sdxl":
        assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
        assert cond["text_embeds"].shape == (2, backbone.text_encoder_2.config.projection_dim)
        assert cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
        # penultimate hidden states of both encoders, concatenated (docs/conventions.md#sdxl)
        ids = backbone.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        first = backbone.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(hidden[:1, :, :first.shape[-1]], first, atol=1e-6)
    else:
        assert set(cond) == {"encoder_hidden_states"}


def test_training_target_follows_the_scheduler(small):
    arch, backbone = small
    z0, noise, t = torch.randn(2, *backbone.latent_shape), torch.randn(2, *backbone.latent_shape), torch.tensor([3, 700])
    target = backbone.training_target(z0, noise, t)
    if arch == "sd21":
        assert backbone.prediction_type == "v_prediction"
        assert torch.allclose(target, backbone.noise_scheduler.get_velocity(z0, noise, t), atol=1e-6)
    else:
        assert backbone.prediction_type == "epsilon" and torch.equal(target, noise)


def test_sdxl_time_ids_come_from_the_batch():
    backbone = build_random_backbone("sdxl", scale="small")
    batch = {"original_size": torch.tensor([[100, 200], [64, 64]]), "crop_top_left": torch.tensor([[0, 18], [0, 0]])}
    ids = backbone.image_conditioning(batch)["time_ids"]
    assert ids.tolist() == [[100, 200, 0, 18, 64, 64], [64, 64, 0, 0, 64, 64]]
    neg = backbone.negative_conditioning(2)  # SDXL base: zeros for the empty negative prompt
    assert not neg["encoder_hidden_states"].any() and not neg["text_embeds"].any()
    assert StableDiffusionBackbone.image_conditioning(backbone, batch) == {}  # SD 1.x/2.x: caption only


def test_one_dpo_step_trains_lora(small):
    arch, backbone = small
    backbone = build_random_backbone(arch, scale="small")  # a fresh copy: LoRA is added in place
    add_lora(backbone.unet, rank=4, alpha=4)
    params = [p for p in backbone.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    cond = backbone.encode_prompt(["a cat", "a dog"])
    if arch == "sdxl":
        cond.update(backbone.image_conditioning({"original_size": torch.tensor([[80, 120], [64, 64]]),
                                                 "crop_top_left": torch.tensor([[0, 5], [0, 0]])}))
    batch = PairBatch(latents_w=torch.randn(2, *backbone.latent_shape, generator=gen),
                      latents_l=torch.randn(2, *backbone.latent_shape, generator=gen), cond=cond,
                      index=torch.tensor([0, 1]), step=0)
    objective = DiffusionDPO(beta=5000)
    first = objective(backbone, batch, seed=0)
    assert first.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    first.loss.backward()
    optimizer.step()
    second = objective(backbone, batch, seed=0)
    assert second.loss.item() < first.loss.item()  # one step on the same batch lowers its loss


def test_save_and_load_round_trip_in_diffusers_layout(small, tmp_path):
    arch, backbone = small
    folder = backbone.save_pretrained(tmp_path / arch)
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if arch == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert expected <= {p.name for p in folder.iterdir() if p.is_dir()}
    node = OmegaConf.load(REPO / "conf" / "backbone" / f"{arch}.yaml")
    node.pretrained_model_name_or_path = str(folder)
    node.resolution = backbone.resolution
    loaded = instantiate(node)
    assert type(loaded) is (StableDiffusionXLBackbone if arch == "sdxl" else StableDiffusionBackbone)
    assert loaded.prediction_type == backbone.prediction_type
    cond = backbone.encode_prompt(["a red bicycle"])
    loaded_cond = loaded.encode_prompt(["a red bicycle"])
    for key in cond:
        assert torch.allclose(cond[key], loaded_cond[key], atol=1e-5), key
    x, t = torch.randn(1, *backbone.latent_shape), torch.tensor([400])
    with torch.no_grad():
        assert torch.allclose(loaded.unet_forward(x, t, cond), backbone.unet_forward(x, t, cond), atol=1e-5)


def test_sdxl_separate_vae_path_error_names_its_key(tmp_path):
    backbone = build_random_backbone("sdxl", scale="small")
    folder = backbone.save_pretrained(tmp_path / "sdxl")
    from alignment.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backbone\.vae_model_name_or_path: cannot load"):
        StableDiffusionXLBackbone.from_pretrained(str(folder), vae_model_name_or_path=str(tmp_path / "no_vae"),
                                                  resolution=64)
