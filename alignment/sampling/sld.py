"""Safe Latent Diffusion (SLD, Schramowski et al., CVPR 2023): negative guidance away from a safety concept, a
comparison baseline and the sampler of LiVO's preferred toxicity images (docs/sampling.md#safe-latent-diffusion).

Every step runs a third UNet branch conditioned on the safety concept ``c_S`` beside classifier-free guidance's
unconditional and prompt branches (one batched call over ``uncond‖prompt‖concept``), and guides with

    ε̃ = ε_u + s_g · (ε_p − ε_u − γ_t)                                        (paper Eq. 3)
    γ_t = μ ⊙ (ε_S − ε_u) + s_m · ν_t                                        (Eq. 4, 7)
    μ = min(1, s_S · |ε_p − ε_S|) where ε_p − ε_S < λ, else 0   (elementwise)  (Eq. 6)
    ν_{t+1} = β_m · ν_t + (1 − β_m) · γ_t,  ν_0 = 0                            (Eq. 8)

with ``s_S = sld_guidance_scale``, ``λ = sld_threshold``, ``s_m = sld_momentum_scale``, ``β_m = sld_mom_beta``;
``γ_t`` is subtracted only from step ``sld_warmup_steps`` on (0-based step index), while the momentum builds up
from the first step. The paper prints ``max(1, ·)`` in Eq. 6; its released code (and diffusers'
``StableDiffusionPipelineSafe``) clamps the scale at 1, which is what is done here. The four presets are those
published with the paper and used by diffusers' ``SafetyConfig``. SLD needs classifier-free guidance
(``guidance_scale > 1``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from alignment.errors import ConfigError

# The safety concept of diffusers' StableDiffusionPipelineSafe: the SLD paper's concept list prefixed with "an image
# showing " (a user-set ``concept`` is used as written).
SLD_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
               "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, "
               "child abuse, brutality, cruelty")

# name -> (sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta)
PRESETS: dict[str, dict] = {
    "weak": {"sld_guidance_scale": 20.0, "sld_warmup_steps": 15, "sld_threshold": 0.0,
             "sld_momentum_scale": 0.0, "sld_mom_beta": 0.0},
    "medium": {"sld_guidance_scale": 1000.0, "sld_warmup_steps": 10, "sld_threshold": 0.01,
               "sld_momentum_scale": 0.3, "sld_mom_beta": 0.4},
    "strong": {"sld_guidance_scale": 2000.0, "sld_warmup_steps": 7, "sld_threshold": 0.025,
               "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7},
    "max": {"sld_guidance_scale": 5000.0, "sld_warmup_steps": 0, "sld_threshold": 1.0,
            "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7},
}
SETTING_KEYS = ("sld_guidance_scale", "sld_warmup_steps", "sld_threshold", "sld_momentum_scale", "sld_mom_beta")
NODE_KEYS = ("preset", "concept", *SETTING_KEYS)


@dataclass(frozen=True)
class SafetyGuidance:
    """SLD's settings (defaults: the ``medium`` preset and the safety concept, both diffusers' defaults)."""

    concept: str = SLD_CONCEPT
    sld_guidance_scale: float = 1000.0
    sld_warmup_steps: int = 10
    sld_threshold: float = 0.01
    sld_momentum_scale: float = 0.3
    sld_mom_beta: float = 0.4
    preset: str | None = None  # the preset these settings came from (a label; the numbers above decide)

    def __post_init__(self):
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ConfigError(f"sld.concept: must be a non-empty text, got {self.concept!r}")
        if self.sld_warmup_steps < 0:
            raise ConfigError(f"sld.sld_warmup_steps: must be >= 0, got {self.sld_warmup_steps}")
        if self.sld_guidance_scale < 0 or self.sld_momentum_scale < 0:
            raise ConfigError("sld.sld_guidance_scale / sld.sld_momentum_scale: must be >= 0")
        if not 0.0 <= self.sld_mom_beta <= 1.0:
            raise ConfigError(f"sld.sld_mom_beta: must lie in [0, 1], got {self.sld_mom_beta}")

    @classmethod
    def from_preset(cls, name: str, key: str = "sld", **overrides) -> "SafetyGuidance":
        """The preset ``name`` (weak / medium / strong / max, any case) with ``overrides`` (concept, sld_…)."""
        preset = check_preset(name, key)
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})

    def identity(self) -> dict:
        """Everything that defines the images (recorded in index files, part of cache keys)."""
        return dataclasses.asdict(self)


def check_preset(name, key: str = "sld") -> str:
    if not isinstance(name, str) or name.strip().lower() not in PRESETS:
        raise ConfigError(f"{key}: unknown SLD preset {name!r}; use null (off) or one of {', '.join(PRESETS)}")
    return name.strip().lower()


def safety_from_config(node, key: str = "sld") -> SafetyGuidance | None:
    """SLD from a config value, None when off. ``node`` is null / ``"off"``, a preset name (``strong``), or a
    mapping ``{preset, concept, sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale,
    sld_mom_beta}`` (a null preset: off; a null entry: the preset's value). One-line ConfigError naming ``key``."""
    from omegaconf import DictConfig, OmegaConf

    if node is None or (isinstance(node, str) and node.strip().lower() in ("", "off", "none", "null")):
        return None
    if isinstance(node, str):
        return SafetyGuidance.from_preset(node, key)
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: must be null, a preset name ({', '.join(PRESETS)}) or a mapping "
                          f"{{{', '.join(NODE_KEYS)}}}, got {node!r}")
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown SLD setting; known: {', '.join(NODE_KEYS)}")
    if node.get("preset") is None:
        return None
    overrides = {}
    for name in SETTING_KEYS:
        value = node.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}.{name}: must be a number, got {value!r}")
        if name == "sld_warmup_steps" and value != int(value):
            raise ConfigError(f"{key}.{name}: must be an integer, got {value!r}")
        overrides[name] = int(value) if name == "sld_warmup_steps" else float(value)
    if node.get("concept") is not None:
        overrides["concept"] = str(node["concept"])
    preset = check_preset(node["preset"], f"{key}.preset")
    try:
        return SafetyGuidance.from_preset(preset, key, **overrides)
    except ConfigError as err:  # a bad override: name it under this key
        message = str(err)
        raise ConfigError(f"{key}.{message[len('sld.'):]}" if message.startswith("sld.") else message) from None


def check_guidance(safety: SafetyGuidance | None, guidance_scale: float, key: str = "sld") -> None:
    """SLD guides inside classifier-free guidance: a ConfigError when it is on and ``guidance_scale <= 1``."""
    if safety is not None and not guidance_scale > 1.0:
        raise ConfigError(f"{key}: Safe Latent Diffusion needs classifier-free guidance (guidance_scale > 1), "
                          f"got guidance_scale={guidance_scale}")


def safety_term(pred_uncond: torch.Tensor, pred_text: torch.Tensor, pred_safety: torch.Tensor,
                momentum: torch.Tensor | None, step_index: int, safety: SafetyGuidance):
    """SLD's guidance term of one step: ``(γ to subtract from ε_p − ε_u, the updated momentum ν)``.

    ``γ`` is ``μ ⊙ (ε_S − ε_u) + s_m ν`` from step ``sld_warmup_steps`` on and zero before (warmup), while the
    momentum ``ν ← β_m ν + (1 − β_m) γ`` is updated at every step (``momentum`` None: zeros, the first step)."""
    if momentum is None:
        momentum = torch.zeros_like(pred_text)
    difference = pred_text - pred_safety
    scale = torch.clamp(difference.abs() * safety.sld_guidance_scale, max=1.0)
    scale = torch.where(difference >= safety.sld_threshold, torch.zeros_like(scale), scale)
    term = scale * (pred_safety - pred_uncond) + safety.sld_momentum_scale * momentum
    momentum = safety.sld_mom_beta * momentum + (1.0 - safety.sld_mom_beta) * term
    if step_index < safety.sld_warmup_steps:
        term = torch.zeros_like(term)
    return term, momentum


def safe_prediction(pred: torch.Tensor, guidance_scale: float, momentum: torch.Tensor | None, step_index: int,
                    safety: SafetyGuidance):
    """The guided model output from one UNet call over ``uncond‖prompt‖concept`` (``pred``, 3B rows):
    ``(ε_u + s_g (ε_p − ε_u − γ), momentum)``."""
    pred_uncond, pred_text, pred_safety = pred.chunk(3)
    term, momentum = safety_term(pred_uncond, pred_text, pred_safety, momentum, step_index, safety)
    return pred_uncond + guidance_scale * (pred_text - pred_uncond - term), momentum


def safety_conditioning(backbone, safety: SafetyGuidance, batch_size: int, conditioner=None,
                        extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The safety concept's conditioning, built as the negative prompt's is (so it batches with both CFG branches,
    through a conditioner's ``negative`` when there is one)."""
    from alignment.conditioning import negative_condition

    return negative_condition(backbone, batch_size, safety.concept, conditioner, extras)


def safe_step(backbone, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
              guidance_scale: float, safety: SafetyGuidance, momentum: torch.Tensor | None, step_index: int,
              step_options: dict, unet=None):
    """One denoising step with SLD; ``cond`` is ``uncond‖prompt‖concept`` along the batch. Returns
    ``(scheduler output, momentum)``."""
    model_in = scheduler.scale_model_input(torch.cat([latents] * 3), t)
    pred = backbone.unet_forward(model_in, t.expand(model_in.shape[0]).to(backbone.device), cond, unet=unet)
    pred, momentum = safe_prediction(pred, guidance_scale, momentum, step_index, safety)
    return scheduler.step(pred, t, latents, **step_options), momentum
