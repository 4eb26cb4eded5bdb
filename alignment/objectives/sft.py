"""Supervised fine-tuning on the preferred images only: ``loss = L(θ; w)`` (the SFT baseline of SPEC §1)."""

from __future__ import annotations

from alignment.objectives.base import Objective, ObjectiveOutput, PairBatch, denoising_error, draw_timesteps_and_noise


class SupervisedFineTuning(Objective):
    needs_reference = False

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        shape = tuple(batch.latents_w.shape[1:])
        timesteps, noise = draw_timesteps_and_noise(seed, batch.step, batch.index, shape,
                                                    backbone.num_train_timesteps)
        device = batch.latents_w.device
        err_w = denoising_error(backbone, batch.latents_w, batch.cond, timesteps.to(device),
                                noise.to(device, batch.latents_w.dtype))
        return ObjectiveOutput(err_w.mean(), {"policy_err_w": err_w.mean().detach()})
