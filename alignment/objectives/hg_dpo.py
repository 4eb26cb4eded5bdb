"""HG-DPO (v1 of the paper): Diffusion-DPO plus a statistic-matching loss against colour shift
(docs/methods.md#hg-dpo-loss).

    L_HG-DPO = L_DiffDPO + λ_stat · L_stat                                    [Eq 9]
    L_stat   = mean_b ‖ μ_c(z_{t−1}^θ) − μ_c(z_{t−1}^ref) ‖²                   [Eq 8]

``z_{t−1}`` is one DDPM sampler step from the noisy **winner** latent ``z_t`` of the DPO term (same t, same ε), taken
once with the policy's prediction and once with the reference's, without guidance; ``μ_c`` is the per-sample mean of
each latent channel over H and W. The step adds the same posterior noise to both, so it cancels in the difference of
the means exactly (μ_c is linear) and is left out: ``z_{t−1}`` is the DDPM posterior mean here. Both predictions are
the DPO term's own passes (``pair_predictions``), so L_stat costs no UNet call.

β follows the project's β/2 convention (docs/diffusion_dpo.md): the paper's Eq 3 has no ½, so its β = 2500 is
``method.beta=5000`` here.
"""

from __future__ import annotations

import torch

from alignment.errors import ConfigError
from alignment.objectives.base import ObjectiveOutput, PairBatch
from alignment.objectives.dpo import DiffusionDPO, pair_inputs, pair_predictions
from alignment.sampling.sample import predicted_clean


def ddpm_posterior_mean(backbone, noisy: torch.Tensor, timesteps: torch.Tensor,
                        prediction: torch.Tensor) -> torch.Tensor:
    """The mean of one DDPM step z_t → z_{t−1} (per-sample t; at t = 0 it is x̂₀):

        μ = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x̂₀ + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · z_t,   α_t = ᾱ_t / ᾱ_{t−1}
    """
    shape = (-1, *([1] * (noisy.dim() - 1)))
    alphas_cumprod = backbone.alphas_cumprod.to(noisy.device).float()
    alpha_bar = alphas_cumprod[timesteps].view(shape)
    previous = torch.where(timesteps > 0, alphas_cumprod[(timesteps - 1).clamp(min=0)],
                           torch.ones_like(alphas_cumprod[timesteps])).view(shape)
    alpha = alpha_bar / previous
    beta = 1 - alpha
    x0 = predicted_clean(backbone.prediction_type, noisy, prediction, alpha_bar, "HG-DPO's statistic loss")
    return (previous.sqrt() * beta / (1 - alpha_bar)) * x0 + (alpha.sqrt() * (1 - previous) / (1 - alpha_bar)) * noisy.float()


def channel_means(latents: torch.Tensor) -> torch.Tensor:
    """μ_c: the mean of each channel over H and W, per sample: (B, C)."""
    return latents.float().mean(dim=(2, 3))


def stat_loss(policy_next: torch.Tensor, reference_next: torch.Tensor) -> torch.Tensor:
    """L_stat [Eq 8]: the batch mean of ‖μ_c(policy) − μ_c(reference)‖² (summed over channels)."""
    return (channel_means(policy_next) - channel_means(reference_next)).pow(2).sum(dim=1).mean()


class HGDPO(DiffusionDPO):
    """Diffusion-DPO + ``lambda_stat`` · L_stat (``method=hg_dpo``)."""

    def __init__(self, beta: float = 5000.0, lambda_stat: float = 10000.0, share_noise: bool = True):
        super().__init__(beta=beta, share_noise=share_noise)
        if isinstance(lambda_stat, bool) or not isinstance(lambda_stat, (int, float)) or lambda_stat < 0:
            raise ConfigError(f"method.lambda_stat must be a number >= 0, got {lambda_stat!r}")
        self.lambda_stat = float(lambda_stat)

    def statistic_loss(self, backbone, batch: PairBatch, seed: int) -> torch.Tensor:
        """L_stat on the winners: one DDPM step from the DPO term's noisy winner latents, policy vs reference."""
        inputs = pair_inputs(backbone, batch, seed, self.share_noise)
        n = batch.batch_size
        noisy, timesteps = inputs.noisy[:n], inputs.timesteps[:n]
        policy = pair_predictions(backbone, batch, seed, self.share_noise, "policy")[:n]
        reference = pair_predictions(backbone, batch, seed, self.share_noise, "reference")[:n]
        return stat_loss(ddpm_posterior_mean(backbone, noisy, timesteps, policy),
                         ddpm_posterior_mean(backbone, noisy, timesteps, reference))

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        dpo = super().forward(backbone, batch, seed)
        if self.lambda_stat == 0:
            return dpo
        stat = self.statistic_loss(backbone, batch, seed)
        logs = dict(dpo.logs, dpo_loss=dpo.loss.detach(), stat_loss=stat.detach())
        return ObjectiveOutput(dpo.loss + self.lambda_stat * stat, logs)
