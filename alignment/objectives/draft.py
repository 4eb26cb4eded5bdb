"""DRaFT-K and AlignProp: maximise a differentiable reward of images sampled with gradient
(docs/methods.md#draft-k-and-alignprop).

    Î = sample(θ, c, x_T)           DDIM (η = 0), gradient only through the last K steps and the VAE decode
    loss = − mean_b r(Î_b, c_b)      r = Σ_k w_k · scorer_k   (``method.reward: {name: weight}``)

Prompt-only data (``dataset=prompts``). ``x_T`` of each sample is drawn from a generator seeded by (run seed, step,
dataset row), so DDP ranks and resumed runs start from the same noise (docs/conventions.md#reproducible-noise). The
sampler is ``alignment.sampling.grad.sample_with_grad`` (each guided UNet call of the last K steps checkpointed).

``method.truncation`` makes K random (AlignProp): a ``Truncation`` node (``alignment.sampling.grad``), one K per
optimizer step and batch, drawn from a generator seeded by (run seed, step) — every rank and a resumed run draw the
same K. Without it K = ``method.grad_steps`` (DRaFT-K; DRaFT-1 is ``grad_steps=1``).

What the config gets wrong is a one-line ``ConfigError`` when the objective is built, before any model loads: a
reward scorer that is not differentiable, K (or the truncation's range) outside 1 … ``num_inference_steps``, bad
weights. The scorers are checked from their classes through the contract's ``check_scorer_classes`` (the recipe
calls it with the class each configured scorer's ``_target_`` names); built directly (tests), the same checks run on
the scorer objects in ``setup``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from alignment.errors import ConfigError
from alignment.objectives.base import Objective, ObjectiveOutput, PromptBatch, sample_seed
from alignment.seeding import derive_seed

TRUNCATION_STREAM = "truncation"


def _integer(value, key: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")
    return int(value)


def _finite(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(rf"\s*([+-]?)\s*(?:({_NUMBER})\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*")


def parse_reward(reward, key: str = "method.reward") -> dict[str, float]:
    """The reward as an ordered ``{scorer name: weight}``, checked. Accepts a mapping ``{name: weight}`` or a string:
    a scorer name (weight 1) or a weighted sum such as ``-nsfw`` or ``pickscore + 0.1*aesthetic`` (a string in the
    method files, so that an override or an experiment file replaces the reward instead of merging into it)."""
    if isinstance(reward, str):
        text, reward, position = reward, {}, 0
        while position < len(text):
            match = _TERM.match(text, position)
            if match is None or match.end() == position or (reward and not match.group(1)):
                raise ConfigError(f"{key}: cannot read {text!r} as a weighted sum of scorers (e.g. 'pickscore', "
                                  "'-nsfw' or 'pickscore + 0.1*aesthetic')")
            sign = -1.0 if match.group(1) == "-" else 1.0
            name = match.group(3)
            reward[name] = reward.get(name, 0.0) + sign * float(match.group(2) or 1.0)
            position = match.end()
    if not isinstance(reward, Mapping) or not reward:
        raise ConfigError(f"{key} must name at least one scorer, as {{name: weight}} or 'name + 0.5*other', "
                          f"got {reward!r}")
    parsed = {}
    for name, weight in reward.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: scorer names must be strings, got {name!r}")
        parsed[name] = _finite(weight, f"{key}.{name}")
    return parsed


def weighted_reward(scorers: Mapping[str, Any], weights: Mapping[str, float], images: torch.Tensor, prompts,
                    to_scorer: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted reward ``Σ_k w_k · scorer_k(images, prompts)`` (B,) of images in [0, 1], with gradient, and each
    scorer's scores (B,), float32: DRaFT's / Focus-N-Fix's ``method.reward`` and reward guidance's. ``to_scorer``
    moves the images to each scorer's device and dtype first."""
    parts = {}
    for name in weights:
        scorer = scorers[name]
        x = images.to(scorer.device, scorer.dtype) if to_scorer else images
        parts[name] = scorer(x, prompts).float()
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts


def check_differentiable(name: str, scorer, role: str, key: str) -> None:
    """``scorer`` (a class or instance) may be differentiated from the pixels, else a one-line error naming ``key``."""
    if not getattr(scorer, "differentiable", False):
        kind = scorer.__name__ if isinstance(scorer, type) else type(scorer).__name__
        raise ConfigError(f"{key}: scorer {name!r} ({kind}) is not differentiable, so it cannot be {role} "
                          "(choose a differentiable scorer)")


def make_truncation(node, num_inference_steps: int, key: str = "method.truncation"):
    """A ``Truncation`` from its config node (a ``_target_`` mapping, already an object, or None), with its range
    checked to lie in 1 … ``num_inference_steps`` (K = 0 would leave nothing to train)."""
    from alignment.sampling.grad import Truncation

    if node is None:
        return None
    if isinstance(node, Mapping):
        from hydra.utils import get_object

        options = {k: v for k, v in node.items() if not str(k).startswith("_")}
        target = node.get("_target_")
        if not target:
            raise ConfigError(f"{key}: needs a _target_ (alignment.sampling.grad.UniformTruncation or "
                              "GaussianTruncation) or null")
        try:
            cls = get_object(str(target))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{key}._target_: cannot import {target!r}") from err
        try:
            node = cls(**options, **({"key": key} if "key" not in options else {}))
        except TypeError as err:
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    if not isinstance(node, Truncation):
        raise ConfigError(f"{key} must have a draw(generator) method, got {type(node).__name__}")
    low, high = getattr(node, "low", None), getattr(node, "high", None)
    if low is not None and low < 1:
        raise ConfigError(f"{key}.low must be >= 1 (K = 0 steps with gradient trains nothing), got {low}")
    if high is not None and high > num_inference_steps:
        raise ConfigError(f"{key}.high must be at most method.num_inference_steps ({num_inference_steps}), "
                          f"got {high}")
    return node


class DRaFT(Objective):
    """DRaFT-K / AlignProp (module docstring). Logs ``reward`` (the weighted reward's batch mean), each scorer's mean
    as ``reward/<name>`` when there are several, and ``grad_steps`` (K used)."""

    batch_kind = "prompts"
    needs_reference = False

    def __init__(self, reward: dict[str, float] | str = "aesthetic", grad_steps: int = 2,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, truncation: Any = None,
                 negative_prompt: str = "", checkpointing: bool = True):
        super().__init__()
        self.reward_weights = parse_reward(reward)
        self.num_inference_steps = _integer(num_inference_steps, "method.num_inference_steps", 1)
        self.grad_steps = _integer(grad_steps, "method.grad_steps")
        if not 1 <= self.grad_steps <= self.num_inference_steps:
            raise ConfigError(f"method.grad_steps must be between 1 and method.num_inference_steps "
                              f"({self.num_inference_steps}), got {self.grad_steps}")
        self.truncation = make_truncation(truncation, self.num_inference_steps)
        self.guidance_scale = _finite(guidance_scale, "method.guidance_scale")
        self.negative_prompt = str(negative_prompt or "")
        self.checkpointing = bool(checkpointing)
        self.scorer_names = tuple(self.reward_weights)

    # ------------------------------------------------------------------------------------------ checks
    def scorer_roles(self) -> list[tuple[str, str, str]]:
        """(scorer name, what it is used as, config key) for every scorer the objective differentiates."""
        return [(name, "a reward", "method.reward") for name in self.reward_weights]

    def check_scorer_classes(self, classes: dict[str, type], resolution: int | None) -> None:
        """Before any model loads: each scorer the objective uses, from its class, and its input size."""
        for name in dict.fromkeys(self.scorer_names):
            cls = classes.get(name)
            if cls is None:  # not configured, or its _target_ does not import: the recipe names it
                continue
            self.check_scorer(name, cls)
            if resolution is not None and hasattr(cls, "check_resolution"):
                cls.check_resolution(resolution, f"scorers.{name}")

    def check_scorer(self, name: str, scorer) -> None:
        """One scorer (class or instance) against what this objective uses it for."""
        for used, role, key in self.scorer_roles():
            if used == name:
                check_differentiable(name, scorer, role, key)

    def setup(self, backbone, scorers: dict | None = None) -> None:
        for name, scorer in (scorers or {}).items():
            self.check_scorer(name, scorer)
        super().setup(backbone, scorers)

    # ------------------------------------------------------------------------------------------ parts
    def reward(self, images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward (B,) and each scorer's scores (B,) of images in [0, 1]."""
        return weighted_reward({name: self.frozen(name) for name in self.reward_weights}, self.reward_weights,
                               images, prompts)

    def draw_grad_steps(self, seed: int, step: int) -> int:
        """K for this optimizer step: ``grad_steps``, or the truncation's draw from a generator seeded by (seed,
        step) — the same on every rank and after a resume."""
        from alignment.sampling.grad import resolve_grad_steps

        if self.truncation is None:
            return self.grad_steps
        generator = torch.Generator().manual_seed(derive_seed(seed, step, TRUNCATION_STREAM))
        return resolve_grad_steps(self.num_inference_steps, truncation=self.truncation, generator=generator)

    def start_latents(self, backbone, batch: PromptBatch, seed: int) -> torch.Tensor:
        """``x_T`` per sample, seeded by (seed, step, dataset row)."""
        from alignment.sampling.sample import seed_latents

        seeds = [sample_seed(seed, batch.step, int(row)) % (2 ** 31) for row in batch.index.tolist()]
        return seed_latents(backbone, seeds)

    def unconditional(self, backbone, batch: PromptBatch):
        from alignment.conditioning import negative_condition

        if self.guidance_scale == 1.0:
            return None
        return negative_condition(backbone, batch.batch_size, self.negative_prompt, self.conditioner, batch.extras)

    def sample(self, backbone, batch: PromptBatch, latents: torch.Tensor, uncond, grad_steps: int, unet=None):
        from alignment.sampling.grad import sample_with_grad

        return sample_with_grad(backbone, batch.cond, uncond, latents, num_inference_steps=self.num_inference_steps,
                                guidance_scale=self.guidance_scale, grad_steps=grad_steps, unet=unet,
                                checkpointing=self.checkpointing)

    def reward_logs(self, total: torch.Tensor, parts: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        logs = {"reward": total.mean().detach()}
        if len(parts) > 1:
            logs.update({f"reward/{name}": value.mean().detach() for name, value in parts.items()})
        logs["grad_steps"] = torch.tensor(float(k), device=total.device)
        return logs

    # ------------------------------------------------------------------------------------------ loss
    def forward(self, backbone, batch: PromptBatch, seed: int) -> ObjectiveOutput:
        k = self.draw_grad_steps(seed, batch.step)
        latents = self.start_latents(backbone, batch, seed)
        result = self.sample(backbone, batch, latents, self.unconditional(backbone, batch), k)
        total, parts = self.reward(result.images, batch.captions)
        return ObjectiveOutput(-total.mean(), self.reward_logs(total, parts, k))
