"""The ``toy`` backbone: SD-1.5-shaped classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with the real CLIP
BPE tokenizer, DDPM/DDIM schedulers with SD's β schedule) at toy-world sizes, with weights the project pretrains
itself (``experiments/toy_world/pretrain.py``) and commits under ``alignment/toy/weights/``:

    weights/config.json         the architecture (``ToyArchitecture`` fields) and the VAE's latent scaling factor
    weights/model.safetensors   ``vae.*``, ``unet.*``, ``text_encoder.*`` tensors

The text encoder's token embedding has 49408 rows, of which the world's captions use a few dozen. The file stores
only the rows of those tokens (``text_encoder.token_rows`` / ``text_encoder.token_ids``); every other row is the
seeded initialisation, which training never changes (no weight decay on it, zero gradient), so the loaded model is
exactly the trained one and the file stays a few MB.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignment.backbones.clip_vocab import build_clip_tokenizer
from alignment.backbones.stable_diffusion import StableDiffusionBackbone
from alignment.backbones.tiny import SD15_SCHEDULER
from alignment.errors import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKEN_ROWS = "text_encoder.token_rows"
TOKEN_IDS = "text_encoder.token_ids"


@dataclass
class ToyArchitecture:
    resolution: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 64)   # 3 levels: 32 px -> 8×8 latents
    latent_channels: int = 4
    scaling_factor: float = 0.18215                # replaced by 1 / std(latents) after the VAE is trained
    unet_channels: tuple[int, ...] = (32, 64)
    unet_cross_attention: tuple[bool, ...] = (True, True)  # per level (down block i and its mirrored up block)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    seed: int = 0
    prediction_type: str = "epsilon"
    extra: dict = field(default_factory=dict)      # free-form notes (training recipe, metrics) kept with the weights

    @classmethod
    def from_dict(cls, values: dict) -> "ToyArchitecture":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("vae_channels", "unet_channels", "unet_cross_attention"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def build_text_encoder(arch: ToyArchitecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(arch.seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden_size, intermediate_size=2 * arch.text_hidden_size,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", projection_dim=arch.text_hidden_size))


def build_vae(arch: ToyArchitecture):
    from diffusers import AutoencoderKL

    torch.manual_seed(arch.seed + 1)
    channels = tuple(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=16, sample_size=arch.resolution, scaling_factor=arch.scaling_factor)


def build_unet(arch: ToyArchitecture):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(arch.seed + 2)
    channels = tuple(arch.unet_channels)
    attn = tuple(arch.unet_cross_attention)
    if len(attn) != len(channels):
        raise ConfigError(f"toy architecture: unet_cross_attention has {len(attn)} entries for {len(channels)} levels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    latent_side = arch.resolution // 2 ** (len(arch.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        block_out_channels=channels, layers_per_block=arch.unet_layers_per_block, norm_num_groups=16,
        down_block_types=down, up_block_types=up, cross_attention_dim=arch.text_hidden_size,
        attention_head_dim=arch.attention_head_dim)


def build_schedulers(arch: ToyArchitecture):
    from diffusers import DDIMScheduler, DDPMScheduler

    noise_scheduler = DDPMScheduler(**SD15_SCHEDULER, prediction_type=arch.prediction_type)
    return noise_scheduler, DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)


def assemble(arch: ToyArchitecture, tokenizer, text_encoder, vae, unet, name: str = "toy", source: str | None = None,
             dtype: str = "float32") -> StableDiffusionBackbone:
    noise_scheduler, sample_scheduler = build_schedulers(arch)
    return StableDiffusionBackbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler,
                                   resolution=arch.resolution, name=name, source=source, dtype=dtype)


# ------------------------------------------------------------------------------------------------ weights
def world_token_ids(tokenizer) -> list[int]:
    """Token ids the world's captions (and the empty prompt) can produce: BOS, EOS (= padding) and every word."""
    from alignment.toy.world import all_captions

    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for caption in all_captions() + [""]:
        ids.update(tokenizer(caption).input_ids)
    return sorted(int(i) for i in ids)


def embedding_key(text_encoder) -> str:
    """The state-dict key of the token embedding (its name differs between transformers versions)."""
    weight = text_encoder.get_input_embeddings().weight
    for name, param in text_encoder.named_parameters():
        if param is weight:
            return f"text_encoder.{name}"
    raise ConfigError("toy backbone: the text encoder's token embedding is not among its parameters")


def state_to_save(text_encoder, vae, unet, token_ids: list[int]) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().float().contiguous()
    full = state.pop(embedding_key(text_encoder))
    ids = torch.tensor(token_ids, dtype=torch.long)
    state[TOKEN_IDS] = ids
    state[TOKEN_ROWS] = full[ids].contiguous()
    return state


def save_weights(folder: str | Path, arch: ToyArchitecture, text_encoder, vae, unet, tokenizer) -> Path:
    """Write config.json + model.safetensors (atomically) into ``folder``."""
    from safetensors.torch import save_file

    from alignment.files import atomic_write, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch.scaling_factor = float(vae.config.scaling_factor)
    state = state_to_save(text_encoder, vae, unet, world_token_ids(tokenizer))
    atomic_write_text(json.dumps(arch.to_dict(), indent=1) + "\n", folder / CONFIG_FILE)
    atomic_write(folder / MODEL_FILE,
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "kind": "alignment-toy-backbone"}))
    return folder


def load_state(text_encoder, vae, unet, state: dict[str, torch.Tensor], where: str) -> None:
    state = dict(state)
    if TOKEN_ROWS in state:
        ids, rows = state.pop(TOKEN_IDS).long(), state.pop(TOKEN_ROWS)
        full = text_encoder.get_input_embeddings().weight.detach().clone()  # the seeded init of every other row
        full[ids] = rows.to(full.dtype)
        state[embedding_key(text_encoder)] = full
    for prefix, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not part:
            continue  # e.g. a checkpoint of the VAE stage only
        missing, unexpected = module.load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ConfigError(f"{where}: {prefix} weights do not match the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def read_architecture(folder: Path) -> ToyArchitecture:
    return ToyArchitecture.from_dict(json.loads((folder / CONFIG_FILE).read_text()))


def build_toy_backbone(weights: str | None = None, random_init: bool = False, name: str = "toy",
                       dtype: str = "float32", resolution: int | None = None,
                       architecture: dict | None = None) -> StableDiffusionBackbone:
    """The pretrained toy backbone from ``weights`` (a folder with config.json + model.safetensors; default the
    committed ``alignment/toy/weights/``). ``random_init=True`` builds the same architecture with its seeded random
    initialisation instead (the baseline the tests compare against); ``architecture`` overrides fields of the
    architecture (only with ``random_init``). ``resolution``, if given, must be the architecture's (32)."""
    folder = Path(weights).expanduser() if weights else WEIGHTS_DIR
    has_weights = (folder / CONFIG_FILE).exists() and (folder / MODEL_FILE).exists()
    if random_init:
        arch = read_architecture(folder) if has_weights else ToyArchitecture()
        if architecture:
            arch = ToyArchitecture.from_dict({**arch.to_dict(), **dict(architecture)})
    elif not has_weights:
        raise ConfigError(f"backbone.weights: no trained toy weights in {folder} (config.json + model.safetensors; "
                          f"train them with experiments/toy_world/pretrain.py)")
    else:
        if architecture:
            raise ConfigError("backbone.architecture: only with backbone.random_init=true (trained weights fix it)")
        arch = read_architecture(folder)
    if resolution is not None and int(resolution) != arch.resolution:
        raise ConfigError(f"backbone.resolution: the toy backbone is trained at {arch.resolution} px, got {resolution}")
    tokenizer = build_clip_tokenizer()
    text_encoder, vae, unet = build_text_encoder(arch, tokenizer), build_vae(arch), build_unet(arch)
    source = None
    if not random_init:
        from safetensors.torch import load_file

        load_state(text_encoder, vae, unet, load_file(str(folder / MODEL_FILE)), f"backbone.weights ({folder})")
        source = str(folder / MODEL_FILE)
    return assemble(arch, tokenizer, text_encoder, vae, unet, name=name if not random_init else f"{name}-random",
                    source=source, dtype=dtype)
