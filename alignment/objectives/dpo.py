"""Diffusion-DPO (Wallace et al. 2024), docs/diffusion_dpo.md.

    Δθ   = L(θ; w)   − L(θ; l)
    Δref = L(ref; w) − L(ref; l)
    z    = −(β/2) · (Δθ − Δref)
    loss = − log σ(z)

with ``L`` the per-sample mean denoising error, and w and l sharing one timestep and one noise draw
(``share_noise``, docs/conventions.md#pairs-share-noise-and-timestep). One policy forward runs over w‖l and one
reference forward over the same noisy inputs; both are shared with any other term of a composed objective that
needs them (``pair_predictions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignment.backbones.stable_diffusion import cat_cond
from alignment.errors import ConfigError
from alignment.objectives.base import (Objective, ObjectiveOutput, PairBatch, draw_timesteps_and_noise,
                                       per_sample_mse, shared_pass)


def dpo_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor,
             ref_err_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Diffusion-DPO loss and its inside term ``z`` (β/2 convention, docs/diffusion_dpo.md)."""
    z = -0.5 * beta * ((policy_err_w - policy_err_l) - (ref_err_w - ref_err_l))
    return -F.logsigmoid(z), z


@dataclass
class PairInputs:
    """The noisy inputs of a pair batch, w‖l concatenated along the batch: what policy and reference both see."""

    latents: torch.Tensor        # (2B, C, h, w) clean latents w‖l
    noisy: torch.Tensor          # (2B, C, h, w) z_t
    timesteps: torch.Tensor      # (2B,)
    noise: torch.Tensor          # (2B, C, h, w) ε
    target: torch.Tensor         # ε or v, from the scheduler's prediction type
    cond: dict[str, torch.Tensor]


def pair_inputs(backbone, batch: PairBatch, seed: int, share_noise: bool = True) -> PairInputs:
    """Timesteps and noise of w and l (one draw for both when ``share_noise``; otherwise HG-DPO's Eq 3 reading: the
    same timestep, the loser's noise from its own stream), the noisy latents and the training target."""
    def compute() -> PairInputs:
        shape = tuple(batch.latents_w.shape[1:])
        t_w, eps_w = draw_timesteps_and_noise(seed, batch.step, batch.index, shape, backbone.num_train_timesteps)
        if share_noise:
            t_l, eps_l = t_w, eps_w
        else:
            _, eps_l = draw_timesteps_and_noise(seed, batch.step, batch.index, shape,
                                                backbone.num_train_timesteps, stream=1)
            t_l = t_w
        device = batch.latents_w.device
        latents = torch.cat([batch.latents_w, batch.latents_l])
        timesteps = torch.cat([t_w, t_l]).to(device)
        noise = torch.cat([eps_w, eps_l]).to(device, latents.dtype)
        return PairInputs(latents=latents, noisy=backbone.add_noise(latents, noise, timesteps), timesteps=timesteps,
                          noise=noise, target=backbone.training_target(latents, noise, timesteps),
                          cond=cat_cond(batch.cond, batch.cond))

    return shared_pass(batch, ("pair_inputs", seed, share_noise), compute)


def pair_predictions(backbone, batch: PairBatch, seed: int, share_noise: bool = True,
                     model: str = "policy") -> torch.Tensor:
    """The (2B, C, h, w) prediction of the policy (with gradient) or of the reference (no gradient, through the
    reference strategy) on ``pair_inputs`` — computed once per batch whatever number of terms ask for it."""
    inputs = pair_inputs(backbone, batch, seed, share_noise)

    def compute() -> torch.Tensor:
        noisy = inputs.noisy.to(backbone.unet.dtype)
        if model == "policy":
            return backbone.unet_forward(noisy, inputs.timesteps, inputs.cond)
        with torch.no_grad(), backbone.reference_unet() as reference:
            return backbone.unet_forward(noisy, inputs.timesteps, inputs.cond, unet=reference)

    if model not in ("policy", "reference"):
        raise ValueError(f"model must be 'policy' or 'reference', got {model!r}")
    return shared_pass(batch, ("pair_prediction", seed, share_noise, model), compute)


def pair_errors(backbone, batch: PairBatch, seed: int, share_noise: bool = True):
    """Policy and reference errors of w and l on shared noisy inputs; returns four (B,) tensors."""
    inputs = pair_inputs(backbone, batch, seed, share_noise)
    policy = per_sample_mse(pair_predictions(backbone, batch, seed, share_noise, "policy"), inputs.target)
    ref = per_sample_mse(pair_predictions(backbone, batch, seed, share_noise, "reference"), inputs.target)
    policy_w, policy_l = policy.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    return policy_w, policy_l, ref_w, ref_l


class DiffusionDPO(Objective):
    """The Diffusion-DPO loss as a swappable component (``method=dpo``)."""

    def __init__(self, beta: float = 5000.0, share_noise: bool = True):
        super().__init__()
        if not beta > 0:
            raise ConfigError(f"method.beta must be > 0, got {beta}")
        self.beta = float(beta)
        self.share_noise = bool(share_noise)

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        policy_w, policy_l, ref_w, ref_l = pair_errors(backbone, batch, seed, self.share_noise)
        losses, z = dpo_loss(policy_w, policy_l, ref_w, ref_l, self.beta)
        logs = {
            "implicit_acc": (z > 0).float().mean(),
            "reward_margin": z.mean(),
            "policy_err_w": policy_w.mean(), "policy_err_l": policy_l.mean(),
            "ref_err_w": ref_w.mean(), "ref_err_l": ref_l.mean(),
        }
        return ObjectiveOutput(losses.mean(), {k: v.detach() for k, v in logs.items()})
