"""Small objectives, a conditioner and a scorer that prove the method contract's seams (tests/test_contract.py).

They are test parts, not methods: each is as small as it can be while exercising one seam the way a real method
will — a frozen scorer inside the loss (BalancedDPO / Focus-N-Fix), a trainable conditioner that reads a per-sample
extra (LiVO's value encoder), a reward through the gradient sampler on prompt-only data (DRaFT-K).
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.conditioning import Conditioner
from alignment.objectives.base import Objective, ObjectiveOutput, PromptBatch, per_sample_mse
from alignment.objectives.dpo import DiffusionDPO, pair_inputs, pair_predictions
from alignment.scorers.base import Scorer


class TinyNetScorer(Scorer):
    """A scorer with real weights (a seeded random conv net): if anything trained it, its weights would change."""

    differentiable = True

    def __init__(self, seed: int = 0, channels: int = 8):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        features = torch.tanh(self.conv(images.to(self.conv.weight.dtype))).mean(dim=(2, 3))
        return self.head(features).squeeze(1)


class ScoredDPO(DiffusionDPO):
    """Diffusion-DPO plus ``weight · (−score)`` of the policy's decoded x0 estimate of the winner, from a frozen
    scorer: the scorer sits inside the graph, so only freezing keeps it from training."""

    scorer_names = ("tiny_net",)

    def __init__(self, beta: float = 5000.0, share_noise: bool = True, weight: float = 0.1):
        super().__init__(beta=beta, share_noise=share_noise)
        self.weight = float(weight)

    def forward(self, backbone, batch, seed: int) -> ObjectiveOutput:
        out = super().forward(backbone, batch, seed)
        inputs = pair_inputs(backbone, batch, seed, self.share_noise)
        prediction = pair_predictions(backbone, batch, seed, self.share_noise, "policy")
        b = batch.batch_size
        alpha_bar = backbone.alphas_cumprod[inputs.timesteps[:b]].view(-1, 1, 1, 1)
        x0 = (inputs.noisy[:b] - (1 - alpha_bar).sqrt() * prediction[:b]) / alpha_bar.sqrt()
        images = backbone.decode_latents(x0.clamp(-4, 4))
        score = self.frozen("tiny_net")(images, batch.captions).mean()
        out.logs["score"] = score.detach()
        return ObjectiveOutput(out.loss - self.weight * score, out.logs)


class OffsetConditioner(Conditioner):
    """A learned offset added to the prompt embedding, scaled by the per-sample extra ``strength`` (1 when absent):
    a trainable conditioner that reads an extra, like LiVO's value encoder reads ``value``."""

    extras = ("strength",)

    def __init__(self, init_scale: float = 0.0):
        super().__init__(init_scale=init_scale)
        self.init_scale = float(init_scale)
        self.offset = None

    def setup(self, backbone) -> None:
        if self.offset is None:
            width = backbone.text_encoder.config.hidden_size
            self.offset = nn.Parameter(torch.full((width,), self.init_scale))

    def forward(self, backbone, prompts, extras, prompt_cond):
        hidden = prompt_cond["encoder_hidden_states"]
        strength = [1.0 if v is None else float(v) for v in extras.get("strength", [None] * hidden.shape[0])]
        scale = torch.tensor(strength, device=hidden.device, dtype=hidden.dtype).view(-1, 1, 1)
        return {**prompt_cond, "encoder_hidden_states": hidden + scale * self.offset.to(hidden.dtype)}


class ConditionerDPO(Objective):
    """DPO where the policy is the frozen UNet under the trainable conditioner and the reference is the same UNet
    under the plain prompt conditioning (the shape of LiVO's loss, with DPO's form): only the conditioner trains."""

    needs_reference = False

    def __init__(self, beta: float = 2000.0, init_scale: float = 0.0):
        super().__init__()
        self.beta = float(beta)
        self.conditioner = OffsetConditioner(init_scale=init_scale)

    def forward(self, backbone, batch, seed: int) -> ObjectiveOutput:
        from alignment.objectives.dpo import dpo_loss

        inputs = pair_inputs(backbone, batch, seed)
        noisy = inputs.noisy.to(backbone.unet.dtype)
        policy = per_sample_mse(backbone.unet_forward(noisy, inputs.timesteps, inputs.cond), inputs.target)
        with torch.no_grad():
            plain = {k: torch.cat([v, v]) for k, v in batch.prompt_cond.items()}
            ref = per_sample_mse(backbone.unet_forward(noisy, inputs.timesteps, plain), inputs.target)
        policy_w, policy_l = policy.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        losses, z = dpo_loss(policy_w, policy_l, ref_w, ref_l, self.beta)
        return ObjectiveOutput(losses.mean(), {"implicit_acc": (z > 0).float().mean().detach(),
                                               "offset_norm": self.conditioner.offset.norm().detach()})


class RewardThroughSampler(Objective):
    """DRaFT-K in miniature on prompt-only data: sample with gradient through the last ``grad_steps`` DDIM steps
    from per-row seeds, and maximise a frozen differentiable scorer's reward."""

    batch_kind = "prompts"
    needs_reference = False

    def __init__(self, reward: str = "toy_contrast", grad_steps: int = 1, num_inference_steps: int = 10,
                 guidance_scale: float = 3.0):
        super().__init__()
        self.reward = reward
        self.scorer_names = (reward,)
        self.grad_steps = int(grad_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)

    def forward(self, backbone, batch: PromptBatch, seed: int) -> ObjectiveOutput:
        from alignment.conditioning import negative_condition
        from alignment.objectives.base import sample_seed
        from alignment.sampling.grad import sample_with_grad
        from alignment.sampling.sample import seed_latents

        seeds = [sample_seed(seed, batch.step, int(row)) % (2**31) for row in batch.index.tolist()]
        uncond = negative_condition(backbone, batch.batch_size, "", self.conditioner)
        result = sample_with_grad(backbone, batch.cond, uncond, seed_latents(backbone, seeds),
                                  num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                  grad_steps=self.grad_steps)
        reward = self.frozen(self.reward)(result.images, batch.captions)
        return ObjectiveOutput(-reward.mean(), {"reward": reward.mean().detach()})
