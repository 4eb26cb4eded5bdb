"""HG-DPO's statistic-matching loss (alignment/objectives/hg_dpo.py) and LAN (alignment/sampling/lan.py) against
independent computations: diffusers' DDPMScheduler.step for the sampler step, hand-written channel statistics."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from alignment.backbones.tiny import build_tiny_backbone
from alignment.errors import ConfigError
from alignment.objectives.base import PairBatch
from alignment.objectives.dpo import DiffusionDPO, pair_inputs
from alignment.objectives.hg_dpo import HGDPO, ddpm_posterior_mean, stat_loss
from alignment.sampling.lan import lan_normalise, sample_with_lan
from alignment.training.reference import make_reference
from tests.conftest import tiny_lora_backbone


def lora_backbone(perturb: bool):
    backbone = tiny_lora_backbone(seed=321 if perturb else None)
    backbone.use_reference(make_reference("base", backbone.unet, "lora"))
    return backbone


def pair_batch(backbone, step=3):
    gen = torch.Generator().manual_seed(0)
    shape = (3,) + backbone.latent_shape
    cond = backbone.encode_prompt(["a red circle", "a blue square", "a green triangle"])
    return PairBatch(latents_w=torch.randn(shape, generator=gen), latents_l=torch.randn(shape, generator=gen),
                     cond=cond, index=torch.tensor([4, 11, 2]), step=step)


def test_stat_loss_is_zero_when_the_policy_is_the_reference():
    backbone = lora_backbone(perturb=False)
    objective = HGDPO(beta=5000, lambda_stat=10000)
    batch = pair_batch(backbone)
    assert objective.statistic_loss(backbone, batch, seed=0).item() == 0.0
    out = objective(backbone, batch, seed=0)
    assert out.logs["stat_loss"].item() == 0.0
    assert out.loss.item() == pytest.approx(DiffusionDPO(beta=5000)(backbone, batch, seed=0).loss.item())


def test_posterior_mean_is_diffusers_ddpm_step_without_its_noise():
    backbone = build_tiny_backbone(seed=0)
    scheduler = DDPMScheduler.from_config(backbone.noise_scheduler.config)
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(4, *backbone.latent_shape, generator=gen)
    prediction = torch.randn(4, *backbone.latent_shape, generator=gen)
    timesteps = torch.tensor([0, 1, 500, 999])
    mean = ddpm_posterior_mean(backbone, noisy, timesteps, prediction)
    for i, t in enumerate(timesteps.tolist()):
        step = scheduler.step(prediction[i:i + 1], t, noisy[i:i + 1], generator=torch.Generator().manual_seed(7))
        if t == 0:  # the last step adds no noise
            assert torch.allclose(mean[i], step.prev_sample[0], atol=1e-5)
        else:       # the same step with another noise draw differs only by the noise: the means agree
            other = scheduler.step(prediction[i:i + 1], t, noisy[i:i + 1], generator=torch.Generator().manual_seed(8))
            noise_gap = step.prev_sample - other.prev_sample
            variance = scheduler._get_variance(t) ** 0.5
            draws = [torch.randn(step.prev_sample.shape, generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
            assert torch.allclose(noise_gap, variance * (draws[0] - draws[1]), atol=1e-4)
            assert torch.allclose(mean[i], step.prev_sample[0] - variance * draws[0][0], atol=1e-4)


def test_stat_loss_gradient_equals_a_hand_written_version_through_diffusers():
    backbone = lora_backbone(perturb=True)
    objective = HGDPO(beta=5000, lambda_stat=1.0)
    batch = pair_batch(backbone)
    ours = objective.statistic_loss(backbone, batch, seed=0)
    params = [p for n, p in backbone.unet.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(ours, params)

    # by hand: the same noisy winners, one diffusers DDPM step each with policy and reference from the same step
    # noise, channel means over H and W, squared difference summed over channels, mean over the batch
    inputs = pair_inputs(backbone, pair_batch(backbone), 0, True)
    scheduler = DDPMScheduler.from_config(backbone.noise_scheduler.config)
    n = 3
    cond = batch.cond
    losses = []
    for i in range(n):
        t = int(inputs.timesteps[i])
        z_t = inputs.noisy[i:i + 1]
        c = {k: v[i:i + 1] for k, v in cond.items()}
        policy_out = backbone.unet_forward(z_t, inputs.timesteps[i:i + 1], c)
        with torch.no_grad(), backbone.reference_unet() as reference:
            ref_out = backbone.unet_forward(z_t, inputs.timesteps[i:i + 1], c, unet=reference)
        prev_policy = scheduler.step(policy_out, t, z_t, generator=torch.Generator().manual_seed(i)).prev_sample
        prev_ref = scheduler.step(ref_out, t, z_t, generator=torch.Generator().manual_seed(i)).prev_sample
        mu_policy = prev_policy.mean(dim=(2, 3))
        mu_ref = prev_ref.mean(dim=(2, 3))
        losses.append(((mu_policy - mu_ref) ** 2).sum())
    hand = torch.stack(losses).mean()
    assert ours.item() == pytest.approx(hand.item(), rel=1e-4)
    hand_grads = torch.autograd.grad(hand, params)
    for a, b in zip(grads, hand_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads)


def test_hg_dpo_loss_is_dpo_plus_lambda_stat():
    backbone = lora_backbone(perturb=True)
    batch = pair_batch(backbone)
    out = HGDPO(beta=5000, lambda_stat=10000)(backbone, batch, seed=0)
    dpo = DiffusionDPO(beta=5000)(backbone, batch, seed=0).loss
    assert out.logs["stat_loss"].item() > 0
    assert out.loss.item() == pytest.approx(dpo.item() + 10000 * out.logs["stat_loss"].item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"^method\.lambda_stat must be a number >= 0"):
        HGDPO(lambda_stat=-1)


def test_stat_loss_by_hand():
    a = torch.zeros(2, 4, 3, 3)
    b = torch.zeros(2, 4, 3, 3)
    a[0, 1] += 2.0         # sample 0: channel 1 mean differs by 2
    a[1, :, 0, 0] = 9.0    # sample 1: one pixel of each channel: mean differs by 1 in all 4 channels
    assert stat_loss(a, b).item() == pytest.approx((4.0 + 4 * 1.0) / 2)


def test_lan_gives_exactly_the_target_channel_statistics():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen) * 3 + 1
    target = torch.randn(3, 4, 8, 8, generator=gen) * 0.5 - 2
    out = lan_normalise(latents, target)
    assert torch.allclose(out.mean(dim=(2, 3)), target.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), correction=0), target.std(dim=(2, 3), correction=0), atol=1e-5)
    # the shape of each channel is kept: LAN is an affine map per channel
    standard = (latents - latents.mean(dim=(2, 3), keepdim=True)) / latents.std(dim=(2, 3), keepdim=True, correction=0)
    standard_out = (out - out.mean(dim=(2, 3), keepdim=True)) / out.std(dim=(2, 3), keepdim=True, correction=0)
    assert torch.allclose(standard, standard_out, atol=1e-4)


def test_lan_sampling_against_the_same_model_is_plain_sampling():
    from alignment.sampling.sample import sample_images

    backbone = lora_backbone(perturb=True)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    plain = sample_images(backbone, prompts, seeds, num_inference_steps=4, guidance_scale=3.0)
    same = sample_with_lan(backbone, prompts, seeds, target_unet=None, num_inference_steps=4, guidance_scale=3.0)
    assert torch.allclose(plain, same, atol=1e-4)
    # the target as a context factory: adapters off for the target's calls only, the policy keeps its LoRA
    lan = sample_with_lan(backbone, prompts, seeds, target_unet=backbone.reference_unet, num_inference_steps=4,
                          guidance_scale=3.0)
    assert not torch.allclose(plain, lan, atol=1e-3) and torch.isfinite(lan).all()
