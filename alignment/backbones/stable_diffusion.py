"""One interface over the Stable Diffusion denoiser stack (docs/conventions.md#backbone-parts).

``StableDiffusionBackbone`` owns the tokenizer, text encoder, VAE, UNet and two schedulers (DDPM for training,
DDIM for sampling) and exposes the operations every objective needs:

    cond    = backbone.encode_prompt(captions)          # dict of conditioning tensors, batch first
    z0      = backbone.encode_images(pixels_in_minus1_1)
    z_t     = backbone.add_noise(z0, noise, t)
    target  = backbone.training_target(z0, noise, t)   # epsilon or v, from the scheduler's prediction_type
    pred    = backbone.unet_forward(z_t, t, cond)       # the policy UNet (LoRA adapters active, if any)
    with backbone.reference_unet() as ref: ref(...)     # adapters disabled, or the frozen copy

Conditioning is a flat ``dict[str, Tensor]`` so that it can be cached, concatenated and repeated without knowing
the backbone; SD 1.5/2.1 use ``encoder_hidden_states`` only (last hidden state of CLIP, 77 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from alignment.dtypes import parse_dtype
from alignment.errors import ConfigError

def cat_cond(*conds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate conditioning dicts along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def index_cond(cond: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in cond.items()}


class StableDiffusionBackbone(nn.Module):
    """SD 1.x / 2.x: CLIP text encoder, AutoencoderKL, UNet2DConditionModel, DDPM (train) + DDIM (sample)."""

    def __init__(self, tokenizer, text_encoder, vae, unet, noise_scheduler, sample_scheduler, resolution: int,
                 name: str = "sd", source: str | None = None, dtype: str = "float32"):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.sample_scheduler = sample_scheduler
        self.resolution = int(resolution)
        self.name = name
        self.source = source  # hub id / folder the weights came from (None for random init); keys caches
        self.weight_dtype = parse_dtype(dtype)
        self.reference = None  # the reference strategy (alignment.training.reference), set by training
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
        for module in (self.text_encoder, self.vae, self.unet):
            if next(module.parameters()).dtype != self.weight_dtype:  # .to() on a no-op cast makes diffusers warn
                module.to(self.weight_dtype)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.detach().clone().float()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        if self.resolution % self.vae_scale_factor:
            raise ConfigError(f"backbone.resolution: {resolution} is not a multiple of the VAE's downsampling "
                              f"factor {self.vae_scale_factor}")

    # ----------------------------------------------------------------------------------------------- loading
    @staticmethod
    def resolve_source(path: str, subfolders: tuple[str, ...]) -> str:
        """A local folder must exist and hold the diffusers subfolders; anything else is treated as a hub id."""
        looks_local = path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()
        if not looks_local:
            return path
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"backbone.pretrained_model_name_or_path: folder {folder} does not exist")
        missing = [sub for sub in subfolders if not (folder / sub).is_dir()]
        if missing:
            raise ConfigError(f"backbone.pretrained_model_name_or_path: {folder} lacks the diffusers "
                              f"subfolder(s) {', '.join(missing)}")
        return str(folder)

    @staticmethod
    def load_components(path: str, text_towers: dict[str, type], revision: str | None, variant: str | None,
                        dtype: str, prediction_type: str | None, local_files_only: bool | None,
                        vae_model_name_or_path: str | None = None) -> dict:
        """Load tokenizer(s), text encoder(s), VAE, UNet and both schedulers; one-line errors on failure."""
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        common = dict(revision=revision)
        if local_files_only is not None:
            common["local_files_only"] = local_files_only
        weight_dtype = parse_dtype(dtype)  # load straight into the compute dtype (no fp32 copy in memory)
        scheduler_kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        key, source = "backbone.pretrained_model_name_or_path", path
        try:
            parts = {}
            for subfolder, model_class in text_towers.items():
                tokenizer_folder = subfolder.replace("text_encoder", "tokenizer")
                parts[tokenizer_folder] = CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **common)
                parts[subfolder] = model_class.from_pretrained(path, subfolder=subfolder, variant=variant,
                                                               dtype=weight_dtype, **common)
            if vae_model_name_or_path:  # e.g. the fp16-fix SDXL VAE, a standalone diffusers model folder
                key, source = "backbone.vae_model_name_or_path", vae_model_name_or_path
                parts["vae"] = AutoencoderKL.from_pretrained(vae_model_name_or_path, torch_dtype=weight_dtype,
                                                             **common)
                key, source = "backbone.pretrained_model_name_or_path", path
            else:
                parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant,
                                                             torch_dtype=weight_dtype, **common)
            parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant,
                                                                 torch_dtype=weight_dtype, **common)
            parts["noise_scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common,
                                                                     **scheduler_kwargs)
            parts["sample_scheduler"] = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **common,
                                                                      **scheduler_kwargs)
        except (OSError, ValueError) as err:  # hub unreachable, unknown id, missing weight file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{key}: cannot load {source!r}: {first_line}") from err
        return parts

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, revision: str | None = None,
                        variant: str | None = None, dtype: str = "float32", resolution: int = 512,
                        name: str = "sd15", prediction_type: str | None = None,
                        local_files_only: bool | None = None) -> "StableDiffusionBackbone":
        """SD 1.x / 2.x from a hub id or a local folder in the standard diffusers layout."""
        from transformers import CLIPTextModel

        path = cls.resolve_source(str(pretrained_model_name_or_path),
                                  ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
        parts = cls.load_components(path, {"text_encoder": CLIPTextModel}, revision, variant, dtype,
                                    prediction_type, local_files_only)
        return cls(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], parts["noise_scheduler"],
                   parts["sample_scheduler"], resolution=resolution, name=name, source=path, dtype=dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the backbone as a standard diffusers ``StableDiffusionPipeline`` folder (safetensors)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.sample_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # ----------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """SD 1.x/2.x conditioning: the last hidden state of CLIP over 77 padded tokens
        (docs/conventions.md#sd-15-and-sd-21)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return {"encoder_hidden_states": hidden}

    def negative_conditioning(self, batch_size: int, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """The unconditional branch of classifier-free guidance: the (empty) negative prompt's embedding."""
        return self.encode_prompt([negative_prompt] * batch_size)

    def image_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Conditioning that depends on the training image rather than the caption (none for SD 1.x/2.x)."""
        return {}

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> mean and std of the VAE posterior q(z|x) (unscaled); what the latent cache stores."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def latents_from_moments(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z0 = (mean + std · n) · scaling_factor``: one posterior sample with caller-supplied noise
        (docs/conventions.md#latents-and-the-scaling-factor)."""
        return (mean + std * noise.to(mean.dtype)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled VAE latents ``z0 = sample(q(z|x)) * scaling_factor``
        (docs/conventions.md#latents-and-the-scaling-factor)."""
        mean, std = self.encode_moments(pixels)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return self.latents_from_moments(mean, std, noise)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [0, 1] (differentiable; wrap in no_grad when not needed)."""
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ diffusion
    def _alpha_terms(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps].float()
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε`` (docs/conventions.md#noising)."""
        sqrt_a, sqrt_1ma = self._alpha_terms(timesteps, z0.ndim)
        return (sqrt_a * z0.float() + sqrt_1ma * noise.float()).to(z0.dtype)

    def training_target(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ε for epsilon-prediction, ``v = sqrt(ᾱ) ε − sqrt(1−ᾱ) z0`` for v-prediction; read from the scheduler."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            sqrt_a, sqrt_1ma = self._alpha_terms(timesteps, z0.ndim)
            return (sqrt_a * noise.float() - sqrt_1ma * z0.float()).to(noise.dtype)
        raise ConfigError(f"backbone scheduler prediction_type {self.prediction_type!r} is not supported for "
                          "training (epsilon or v_prediction)")

    def unet_forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                     unet: nn.Module | None = None) -> torch.Tensor:
        """One UNet call with this backbone's conditioning; ``unet`` defaults to the policy UNet."""
        unet = self.unet if unet is None else unet
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        kwargs = {"added_cond_kwargs": extra} if extra else {}
        return unet(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], **kwargs,
                    return_dict=False)[0]

    # ------------------------------------------------------------------------------------------ reference
    @property
    def has_adapters(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    def use_reference(self, strategy) -> None:
        """Install the reference strategy (``alignment.training.reference``) that ``reference_unet`` yields."""
        self.reference = strategy

    def make_reference_copy(self) -> None:
        """Full fine-tuning: keep a frozen copy of the initial UNet in the compute dtype
        (docs/conventions.md#the-reference-model)."""
        from alignment.training.reference import FrozenCopy

        self.use_reference(FrozenCopy(self.unet))

    @property
    def reference_copy(self) -> nn.Module | None:
        return getattr(self.reference, "copy", None)

    def reference_unet(self):
        """The reference model, as a context manager yielding the module to call
        (docs/conventions.md#the-reference-model):
        whatever strategy is installed (``method.reference``), by default the frozen copy if there is one, else
        this UNet with its adapters disabled. The policy is active again after the block, even if it raises."""
        if self.reference is None:
            from alignment.training.reference import make_reference

            if not self.has_adapters:
                raise ConfigError("the reference model needs LoRA adapters or a frozen copy "
                                  "(method.finetune must be 'lora' or 'full')")
            self.use_reference(make_reference("base", self.unet, "lora"))
        return self.reference.active()
