"""The sampler with gradient through the last K steps (alignment.sampling.grad; docs/sampling.md).

Tiny backbone with a LoRA whose up-weights are non-zero, so the policy differs from the base and every LoRA matrix
gets a gradient. Five DDIM steps keep the file fast.
"""

from __future__ import annotations

import pytest
import torch

import alignment.sampling.grad as grad_mod
from alignment.errors import ConfigError
from alignment.sampling.grad import (GaussianTruncation, UniformTruncation, resolve_grad_steps, sample_with_grad,
                                     seed_latents)
from alignment.sampling.sample import initial_latents, sample_images

STEPS = 5
PROMPTS = ["a red square", "a blue circle"]
SEEDS = [0, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def backbone():
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.training.lora import add_lora

    backbone = build_tiny_backbone()
    add_lora(backbone.unet, rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backbone.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return backbone


@pytest.fixture(scope="module")
def conditioning(backbone):
    return backbone.encode_prompt(PROMPTS), backbone.negative_conditioning(len(PROMPTS))


@pytest.fixture()
def unet_calls(backbone):
    """``torch.is_grad_enabled()`` at every UNet call (a forward pre-hook); clear it before a backward pass, which
    re-runs checkpointed calls."""
    calls: list[bool] = []
    handle = backbone.unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    yield calls
    handle.remove()


def lora_params(backbone):
    return [p for p in backbone.unet.parameters() if p.requires_grad]


def run(backbone, conditioning, **kwargs):
    cond, uncond = conditioning
    kwargs.setdefault("num_inference_steps", STEPS)
    latents = kwargs.pop("latents", None)
    latents = seed_latents(backbone, SEEDS) if latents is None else latents
    return sample_with_grad(backbone, cond, uncond, latents, **kwargs)


# ------------------------------------------------------------------------------ gradient only in the last K
@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("k", [1, 3, STEPS])
def test_only_the_last_k_unet_calls_record_gradient(backbone, conditioning, unet_calls, k, checkpointing):
    out = run(backbone, conditioning, grad_steps=k, checkpointing=checkpointing)
    assert unet_calls == [False] * (STEPS - k) + [True] * k
    assert out.grad_steps == k and out.images.requires_grad
    assert [x.requires_grad for x in out.x0_predictions] == [False] * (STEPS - k) + [True] * k


@pytest.mark.parametrize("k", [1, 3, STEPS])
def test_start_latents_get_gradient_only_when_all_steps_keep_it(backbone, conditioning, k):
    noise = seed_latents(backbone, SEEDS).requires_grad_()
    out = run(backbone, conditioning, latents=noise, grad_steps=k)
    out.images.mean().backward()
    backbone.unet.zero_grad(set_to_none=True)
    if k < STEPS:
        assert noise.grad is None
    else:
        assert noise.grad is not None and noise.grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_reaches_the_latent_entering_step_n_minus_k_and_no_earlier(backbone, conditioning, monkeypatch,
                                                                           checkpointing):
    """Make the latent entering step N − K a leaf that requires grad: d(images)/d(it) exists and is non-zero, while
    the latent entering the step before carries no graph."""
    k, seen, original = 2, [], grad_mod.guided_step

    def recording_step(backbone, scheduler, latents, *args, **kwargs):
        if len(seen) == STEPS - k:
            latents = latents.detach().requires_grad_()
        seen.append(latents)
        return original(backbone, scheduler, latents, *args, **kwargs)

    monkeypatch.setattr(grad_mod, "guided_step", recording_step)
    out = run(backbone, conditioning, grad_steps=k, checkpointing=checkpointing)
    entering = seen[STEPS - k]
    (d_entering,) = torch.autograd.grad(out.images.sum(), entering)
    assert d_entering.abs().sum() > 0
    assert not seen[STEPS - k - 1].requires_grad and seen[STEPS - k - 1].grad_fn is None
    assert seen[STEPS - k + 1].grad_fn is not None  # the next step's input depends on it


# ------------------------------------------------------------------------------ K = 0 and bad K
def test_k_zero_records_no_graph(backbone, conditioning, unet_calls):
    noise = seed_latents(backbone, SEEDS).requires_grad_()
    out = run(backbone, conditioning, latents=noise, grad_steps=0)
    assert unet_calls == [False] * STEPS
    assert not out.images.requires_grad and out.images.grad_fn is None and out.latents.grad_fn is None
    assert out.grad_steps == 0


@pytest.mark.parametrize("k", [STEPS + 1, -1, 1.5, True, "2"])
def test_bad_k_is_a_one_line_config_error(backbone, conditioning, k):
    with pytest.raises(ConfigError, match="method.grad_steps") as err:
        run(backbone, conditioning, grad_steps=k)
    assert "\n" not in str(err.value)


def test_cfg_without_uncond_is_a_config_error(backbone, conditioning):
    cond, _ = conditioning
    with pytest.raises(ConfigError, match="uncond"):
        sample_with_grad(backbone, cond, None, seed_latents(backbone, SEEDS), num_inference_steps=2)


# ------------------------------------------------------------------------------ same values as sample_images
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_forward_equals_sample_images(backbone, conditioning, guidance_scale):
    expected = sample_images(backbone, PROMPTS, SEEDS, num_inference_steps=STEPS, guidance_scale=guidance_scale)
    for k, checkpointing in ((0, True), (2, True), (STEPS, False)):
        out = run(backbone, conditioning, guidance_scale=guidance_scale, grad_steps=k, checkpointing=checkpointing)
        torch.testing.assert_close(out.images.detach(), expected, atol=1e-6, rtol=0)


def test_seed_latents_are_sample_images_start_noise(backbone):
    assert torch.equal(seed_latents(backbone, SEEDS), initial_latents(SEEDS, backbone.latent_shape))


def test_reference_unet_matches_sample_images_and_differs_from_policy(backbone, conditioning):
    policy = sample_images(backbone, PROMPTS, SEEDS, num_inference_steps=STEPS)
    with backbone.reference_unet() as reference:
        expected = sample_images(backbone, PROMPTS, SEEDS, num_inference_steps=STEPS, unet=reference)
        out = run(backbone, conditioning, grad_steps=1, unet=reference)
        torch.testing.assert_close(out.images.detach(), expected, atol=1e-6, rtol=0)
    assert (expected - policy).abs().max() > 1e-4


# ------------------------------------------------------------------------------ gradients into the LoRA
def lora_grads(backbone, conditioning, checkpointing: bool, k: int = 2) -> list[torch.Tensor]:
    backbone.unet.zero_grad(set_to_none=True)
    out = run(backbone, conditioning, grad_steps=k, checkpointing=checkpointing)
    target = torch.linspace(0, 1, out.images.numel()).view_as(out.images)  # a differentiable "reward"
    ((out.images - target) ** 2).mean().backward()
    grads = [p.grad.detach().clone() for p in lora_params(backbone)]
    backbone.unet.zero_grad(set_to_none=True)
    return grads


def test_loss_on_images_reaches_lora_with_and_without_checkpointing(backbone, conditioning):
    with_ckpt = lora_grads(backbone, conditioning, checkpointing=True)
    without = lora_grads(backbone, conditioning, checkpointing=False)
    assert len(with_ckpt) == len(lora_params(backbone)) > 0
    assert all(g.abs().sum() > 0 for g in with_ckpt)
    for a, b in zip(with_ckpt, without):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------ randomised truncation
@pytest.mark.parametrize("truncation", [UniformTruncation(1, 4), GaussianTruncation(mean=3, std=5, low=1, high=4)])
def test_truncation_draws_are_reproducible_and_in_bounds(truncation):
    draws = [truncation.draw(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same K
    generator = torch.Generator().manual_seed(1)
    sequence = [truncation.draw(generator) for _ in range(200)]
    again = torch.Generator().manual_seed(1)
    assert sequence == [truncation.draw(again) for _ in range(200)]
    assert min(sequence) >= 1 and max(sequence) <= 4 and set(sequence) == {1, 2, 3, 4}  # wide std hits both clips


def test_sampler_uses_the_drawn_k(backbone, conditioning, unet_calls):
    truncation = UniformTruncation(0, STEPS)
    expected = truncation.draw(torch.Generator().manual_seed(3))
    out = run(backbone, conditioning, truncation=truncation, generator=torch.Generator().manual_seed(3),
              guidance_scale=1.0)
    assert out.grad_steps == expected
    assert unet_calls == [False] * (STEPS - expected) + [True] * expected


def test_bad_truncation_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="method.truncation"):
        UniformTruncation(3, 2)
    with pytest.raises(ConfigError, match="method.truncation.std"):
        GaussianTruncation(mean=8, std=-1, low=0, high=50)
    with pytest.raises(ConfigError, match="method.truncation") as err:  # draws beyond the number of steps
        resolve_grad_steps(10, truncation=UniformTruncation(11, 12))
    assert "\n" not in str(err.value)
