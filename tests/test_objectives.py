"""Diffusion-DPO and SFT against independent computations on fixed tensors (docs/conventions.md,
docs/diffusion_dpo.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.backbones.tiny import build_tiny_backbone
from alignment.errors import ConfigError
from alignment.objectives.base import PairBatch, draw_timesteps_and_noise, per_sample_mse
from alignment.objectives.dpo import DiffusionDPO, dpo_loss
from alignment.objectives.sft import SupervisedFineTuning
from alignment.training.lora import add_lora
from tests.conftest import tiny_lora_backbone


def test_dpo_loss_hand_computed():
    # Δθ = 0.1 − 0.2 = −0.1, Δref = 0.15 − 0.15 = 0, z = −(10/2)(−0.1 − 0) = 0.5, loss = log(1 + e^−0.5)
    loss, z = dpo_loss(torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.15]), torch.tensor([0.15]), beta=10)
    assert z.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    # the policy getting worse on w than the reference: negative z, loss above log 2
    loss, z = dpo_loss(torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2]), torch.tensor([0.2]), beta=2)
    assert z.item() == pytest.approx(-0.1) and loss.item() > math.log(2)


def test_per_sample_error_is_a_mean_not_a_sum():
    pred, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    target[1] *= 2
    assert per_sample_mse(pred, target).tolist() == [1.0, 4.0]


def test_negative_beta_is_rejected_with_its_key():
    with pytest.raises(ConfigError, match=r"method\.beta must be > 0, got -5"):
        DiffusionDPO(beta=-5)


def test_noise_depends_only_on_seed_step_and_row():
    t1, e1 = draw_timesteps_and_noise(0, 3, torch.tensor([5, 9]), (4, 2, 2), 1000)
    t2, e2 = draw_timesteps_and_noise(0, 3, torch.tensor([9, 5]), (4, 2, 2), 1000)
    assert torch.equal(t1.flip(0), t2) and torch.equal(e1.flip(0), e2)  # batch layout does not matter
    t3, e3 = draw_timesteps_and_noise(0, 4, torch.tensor([5, 9]), (4, 2, 2), 1000)
    assert not torch.equal(e1, e3)  # a new step draws new noise
    assert ((t1 >= 0) & (t1 < 1000)).all()


@pytest.fixture(scope="module")
def lora_backbone():
    return tiny_lora_backbone(seed=123)  # the policy differs from the reference (LoRA B starts at zero)


def _pair_batch(backbone, step=7):
    gen = torch.Generator().manual_seed(0)
    shape = (3,) + backbone.latent_shape
    cond = backbone.encode_prompt(["a red circle", "a blue square", "a green triangle"])
    return PairBatch(latents_w=torch.randn(shape, generator=gen), latents_l=torch.randn(shape, generator=gen),
                     cond=cond, index=torch.tensor([4, 11, 2]), step=step)


def _independent_errors(backbone, latents, cond, t, noise):
    """Errors through diffusers' own DDPMScheduler.add_noise and the raw UNet call."""
    noisy = backbone.noise_scheduler.add_noise(latents, noise, t)
    pred = backbone.unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    return F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))


def test_dpo_objective_matches_independent_computation(lora_backbone):
    backbone, batch, beta = lora_backbone, _pair_batch(lora_backbone), 5000.0
    out = DiffusionDPO(beta=beta)(backbone, batch, seed=0)

    t, eps = draw_timesteps_and_noise(0, batch.step, batch.index, tuple(batch.latents_w.shape[1:]), 1000)
    with torch.no_grad():
        pol_w = _independent_errors(backbone, batch.latents_w, batch.cond, t, eps)  # same t and ε for w and l
        pol_l = _independent_errors(backbone, batch.latents_l, batch.cond, t, eps)
        backbone.unet.disable_adapters()
        ref_w = _independent_errors(backbone, batch.latents_w, batch.cond, t, eps)
        ref_l = _independent_errors(backbone, batch.latents_l, batch.cond, t, eps)
        backbone.unet.enable_adapters()
    z = -(beta / 2) * ((pol_w - pol_l) - (ref_w - ref_l))
    expected = -F.logsigmoid(z).mean()

    assert not torch.allclose(pol_w, ref_w)  # the test is meaningful only if policy != reference
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert out.logs["implicit_acc"].item() == pytest.approx((z > 0).float().mean().item())
    assert out.logs["reward_margin"].item() == pytest.approx(z.mean().item(), rel=1e-4, abs=1e-4)
    for key, value in {"policy_err_w": pol_w, "policy_err_l": pol_l, "ref_err_w": ref_w, "ref_err_l": ref_l}.items():
        assert out.logs[key].item() == pytest.approx(value.mean().item(), rel=1e-5)


def test_dpo_gradient_reaches_only_lora(lora_backbone):
    backbone = lora_backbone
    backbone.unet.zero_grad()
    DiffusionDPO(beta=5000)(backbone, _pair_batch(backbone), seed=0).loss.backward()
    grads = {n: p.grad for n, p in backbone.unet.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    backbone.unet.zero_grad()


def test_dpo_at_initialisation_is_log2():
    backbone = build_tiny_backbone(seed=0)
    add_lora(backbone.unet, rank=4, alpha=4)  # B = 0: the policy equals the reference
    out = DiffusionDPO(beta=5000)(backbone, _pair_batch(backbone), seed=0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # mean(z > 0) with z == 0 exactly (docs/diffusion_dpo.md#logged-quantities)
    assert out.logs["implicit_acc"].item() == 0.0


def test_unshared_noise_draws_a_second_stream(lora_backbone):
    batch = _pair_batch(lora_backbone)
    shared = DiffusionDPO(beta=5000, share_noise=True)(lora_backbone, batch, seed=0)
    separate = DiffusionDPO(beta=5000, share_noise=False)(lora_backbone, batch, seed=0)
    assert shared.logs["policy_err_w"].item() == pytest.approx(separate.logs["policy_err_w"].item())
    assert shared.logs["policy_err_l"].item() != pytest.approx(separate.logs["policy_err_l"].item())


def test_sft_is_the_winner_error(lora_backbone):
    backbone, batch = lora_backbone, _pair_batch(lora_backbone)
    out = SupervisedFineTuning()(backbone, batch, seed=0)
    t, eps = draw_timesteps_and_noise(0, batch.step, batch.index, tuple(batch.latents_w.shape[1:]), 1000)
    with torch.no_grad():
        expected = _independent_errors(backbone, batch.latents_w, batch.cond, t, eps).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reference_context_restores_adapters_after_an_exception(lora_backbone):
    backbone = lora_backbone
    x = torch.randn(1, *backbone.latent_shape)
    cond = backbone.encode_prompt(["x"])
    t = torch.tensor([500])
    with torch.no_grad():
        policy = backbone.unet_forward(x, t, cond)
        with pytest.raises(RuntimeError):
            with backbone.reference_unet() as ref:
                reference = backbone.unet_forward(x, t, cond, unet=ref)
                raise RuntimeError("boom")
        after = backbone.unet_forward(x, t, cond)
    assert not torch.allclose(policy, reference)
    assert torch.equal(policy, after)


def test_full_finetune_reference_is_a_frozen_copy():
    backbone = build_tiny_backbone(seed=0)
    backbone.make_reference_copy()
    backbone.unet.requires_grad_(True)
    with torch.no_grad():
        next(backbone.unet.parameters()).add_(1.0)
    with backbone.reference_unet() as ref:
        assert ref is backbone.reference_copy
        assert not any(p.requires_grad for p in ref.parameters())
        assert not torch.equal(next(ref.parameters()), next(backbone.unet.parameters()))
