"""Supervised fine-tuning on the preferred images only: ``loss = L(θ; w)`` (docs/diffusion_dpo.md#sft-baseline).

As a term of a composed objective (``terms=[sft]`` beside DPO) it reuses the policy's pass over w‖l that the DPO
term already made — the winner's timestep and noise are the same draw — so the regulariser costs no UNet call.
"""

from __future__ import annotations

from alignment.objectives.base import (Objective, ObjectiveOutput, PairBatch, denoising_error,
                                       draw_timesteps_and_noise, per_sample_mse, shared_pass)


class SupervisedFineTuning(Objective):
    needs_reference = False

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        from alignment.objectives.dpo import pair_inputs

        err_w = None
        for share_noise in (True, False):  # a pair pass made by another term: its first half is the winner's
            prediction = batch.memo.get(("pair_prediction", seed, share_noise, "policy"))
            if prediction is not None:
                target = pair_inputs(backbone, batch, seed, share_noise).target
                err_w = per_sample_mse(prediction[:batch.batch_size], target[:batch.batch_size])
                break
        if err_w is None:
            err_w = shared_pass(batch, ("winner_error", seed), lambda: self._winner_error(backbone, batch, seed))
        return ObjectiveOutput(err_w.mean(), {"policy_err_w": err_w.mean().detach()})

    @staticmethod
    def _winner_error(backbone, batch: PairBatch, seed: int):
        shape = tuple(batch.latents_w.shape[1:])
        timesteps, noise = draw_timesteps_and_noise(seed, batch.step, batch.index, shape,
                                                    backbone.num_train_timesteps)
        device = batch.latents_w.device
        return denoising_error(backbone, batch.latents_w, batch.cond, timesteps.to(device),
                               noise.to(device, batch.latents_w.dtype))
