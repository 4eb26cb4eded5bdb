"""Diffusion-DPO (Wallace et al. 2024), SPEC §1.

    Δθ   = L(θ; w)   − L(θ; l)
    Δref = L(ref; w) − L(ref; l)
    z    = −(β/2) · (Δθ − Δref)
    loss = − log σ(z)

with ``L`` the per-sample mean denoising error, and w and l sharing one timestep and one noise draw
(``share_noise``, SPEC §0). One policy forward runs over w‖l and one reference forward over the same noisy inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignment.backbones.stable_diffusion import cat_cond
from alignment.errors import ConfigError
from alignment.objectives.base import (Objective, ObjectiveOutput, PairBatch, denoising_error,
                                       draw_timesteps_and_noise)


def dpo_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor,
             ref_err_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Diffusion-DPO loss and its inside term ``z`` (SPEC §1, β/2 convention)."""
    z = -0.5 * beta * ((policy_err_w - policy_err_l) - (ref_err_w - ref_err_l))
    return -F.logsigmoid(z), z


def pair_errors(backbone, batch: PairBatch, seed: int, share_noise: bool = True):
    """Policy and reference errors of w and l on shared noisy inputs; returns four (B,) tensors.

    The reference pass runs without gradient, with the LoRA adapters disabled (or on the frozen copy).
    """
    shape = tuple(batch.latents_w.shape[1:])
    t_w, eps_w = draw_timesteps_and_noise(seed, batch.step, batch.index, shape, backbone.num_train_timesteps)
    if share_noise:
        t_l, eps_l = t_w, eps_w
    else:  # HG-DPO's Eq 3 writes separate ε^w, ε^l: draw the loser's from its own stream
        t_l, eps_l = draw_timesteps_and_noise(seed, batch.step, batch.index, shape, backbone.num_train_timesteps,
                                              stream=1)
    device = batch.latents_w.device
    latents = torch.cat([batch.latents_w, batch.latents_l])
    timesteps = torch.cat([t_w, t_l]).to(device)
    noise = torch.cat([eps_w, eps_l]).to(device, latents.dtype)
    cond = cat_cond(batch.cond, batch.cond)
    policy = denoising_error(backbone, latents, cond, timesteps, noise)
    with torch.no_grad(), backbone.reference_unet() as reference:
        ref = denoising_error(backbone, latents, cond, timesteps, noise, unet=reference)
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
