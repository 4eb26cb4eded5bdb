"""Speed switches applied to a built backbone (``speed`` in conf/config.yaml). Each is independent and safe to
turn off; ``auto`` means on when training on CUDA, off on CPU (where channels_last/compile do not pay)."""

from __future__ import annotations

import warnings

import torch

from alignment.errors import ConfigError

ATTENTION = ("sdpa", "eager")


def wants_cuda(accelerator: str | None) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_flag(value, key: str, on_cuda: bool) -> bool:
    if value == "auto":
        return on_cuda
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true, false or auto, got {value!r}")


def apply_speed(backbone, speed: dict, accelerator: str | None = "cpu") -> dict[str, object]:
    """Set the UNet's attention processor (PyTorch SDPA or eager), memory format and compilation; returns what was
    applied, for the run log."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    on_cuda = wants_cuda(accelerator)
    attention = speed.get("attention", "sdpa")
    if attention not in ATTENTION:
        raise ConfigError(f"speed.attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    processor = AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()
    if not getattr(backbone.unet.config, "addition_embed_type", None) == "image":  # plain attention everywhere
        backbone.unet.set_attn_processor(processor)
    channels_last = resolve_flag(speed.get("channels_last", "auto"), "speed.channels_last", on_cuda)
    if channels_last:
        backbone.unet.to(memory_format=torch.channels_last)
        backbone.vae.to(memory_format=torch.channels_last)
    compile_unet = resolve_flag(speed.get("compile", False), "speed.compile", on_cuda)
    if compile_unet:
        backbone.unet.compile(mode=speed.get("compile_mode", None) or None)
    return {"attention": attention, "channels_last": channels_last, "compile": compile_unet}


def make_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """``adamw`` or ``adamw8bit`` (bitsandbytes, when importable; otherwise AdamW with a warning,
    docs/diffusion_dpo.md#default-training-regimes)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: F401

            return bnb.optim.AdamW8bit(params, **kwargs)
        except Exception as err:  # not installed, or no CUDA build of its kernels
            warnings.warn(f"method.optimizer.name=adamw8bit: bitsandbytes unavailable ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using torch AdamW", stacklevel=2)
            return torch.optim.AdamW(params, **kwargs)
    raise ConfigError(f"method.optimizer.name: {name!r} is not supported (adamw, adamw8bit)")
