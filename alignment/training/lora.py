"""LoRA adapters on the UNet through peft, saved in the format ``StableDiffusionPipeline.load_lora_weights`` reads."""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.errors import ConfigError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int = 8, alpha: float | None = None, target_modules=("to_q", "to_k", "to_v", "to_out.0"),
             dropout: float = 0.0) -> None:
    """Attach a trainable LoRA adapter (B initialised to zero, so the policy starts equal to the reference)."""
    from peft import LoraConfig

    if int(rank) < 1:
        raise ConfigError(f"method.lora.rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        lora_dropout=float(dropout), init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"method.lora.target_modules: {list(target_modules)} — {str(err).splitlines()[0]}") from err
    # LoRA weights train in fp32 even when the frozen base is in bf16/fp16.
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_state_dict(unet, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trained adapter's weights with diffusers' key names (``...lora.down.weight`` / ``...lora.up.weight``);
    from ``state_dict`` (the UNet's full state, e.g. gathered from a sharded model) when given, else the live UNet."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state_dict))


def save_lora(unet, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (with the LoRA config as metadata, so alpha survives)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in lora_state_dict(unet, state_dict).items()}
    metadata = unet.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=metadata, safe_serialization=True)
    return folder / LORA_WEIGHT_NAME
