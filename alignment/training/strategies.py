"""Distributed strategies that need Python objects the YAML cannot express."""

from __future__ import annotations


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False, **kwargs):
    """FSDP that wraps each UNet transformer block and ResNet block (and CLIP encoder layers) as one unit.

    ``use_orig_params=True`` lets frozen base weights and trainable LoRA weights share a flat parameter.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    blocks = {BasicTransformerBlock, ResnetBlock2D, CLIPEncoderLayer}
    return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=sharding_strategy, use_orig_params=True,
                        activation_checkpointing_policy=blocks if activation_checkpointing else None, **kwargs)
