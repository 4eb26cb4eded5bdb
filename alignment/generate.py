"""Image generation entry point: a backbone, optionally a trained LoRA, prompts × seeds -> PNG files + index.

    python -m alignment.generate prompt="a red circle on a white background" seeds=[0,1,2,3]
    python -m alignment.generate prompts=parti.tsv adapter=outputs/dpo-sd15/2025-01-01_12-00-00 \\
        backbone=sd15 backbone.pretrained_model_name_or_path=/models/sd15 out_dir=images/dpo
    python -m alignment.generate -m lora_scale=0,0.5,1 ...   # Hydra sweep, one folder per job

The backbone is built from the same ``backbone`` config node that training uses. The LoRA is read by diffusers' own
``StableDiffusionPipeline.load_lora_weights`` (the file a stock pipeline reads is exactly what is sampled here) and
scaled by ``lora_scale`` through ``set_adapters``. Sampling is the project's ``sample_images``: image ``(prompt,
seed)`` starts from the noise of ``torch.Generator().manual_seed(seed)``, so the same seed gives the same starting
noise for every model compared.

Output (``out_dir``): ``{prompt_index:05d}_seed{seed}.png`` per image, ``index.jsonl`` (one line per image) and
``grid.png`` (one row per prompt, one column per seed). Every file is written atomically; ``index.jsonl`` is removed
at the start and written last, so when it exists it describes the images of one complete run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from alignment.cli import entry_point
from alignment.errors import AlignmentError, ConfigError, DataError
from alignment.files import atomic_write, atomic_write_text
from alignment.training.lora import LORA_WEIGHT_NAME

ADAPTER_NAME = "lora"
INDEX_NAME = "index.jsonl"
GRID_NAME = "grid.png"
GRID_MAX_ROWS = 64  # grid.png shows at most this many prompts (a PartiPrompts grid would not fit in memory)
IMAGE_PATTERN = re.compile(r"^\d{5,}_seed-?\d+\.png$")


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:05d}_seed{seed}.png"


# ------------------------------------------------------------------------------------------------ config checks
def load_prompts(prompts_file, prompt) -> list[str]:
    """Exactly one of ``prompts`` (a prompt file read by ``read_prompts``) or ``prompt`` (one string)."""
    from alignment.data.prompts import read_prompts

    if (prompts_file is None) == (prompt is None):
        which = "both are set" if prompts_file is not None else "neither is set"
        raise ConfigError(f"prompts / prompt: set exactly one of prompts=<prompt file> or prompt=<text> ({which})")
    if prompt is not None:
        if isinstance(prompt, (ListConfig, list, tuple, dict, DictConfig)):
            raise ConfigError("prompt: must be a single string (quote it if it holds commas: 'prompt=\"a, b\"'); "
                              "for several prompts use prompts=<file>")
        return [str(prompt).strip()]
    if not isinstance(prompts_file, str) or not prompts_file.strip():
        raise ConfigError(f"prompts: must be the path of a prompt file (.txt/.jsonl/.json/.tsv/.csv), "
                          f"got {prompts_file!r}")
    try:
        return read_prompts(prompts_file)
    except DataError as err:
        raise DataError(f"prompts: {err}") from err


def check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, (ListConfig, list, tuple)):
        raise ConfigError(f"seeds: must be a list of integers, e.g. seeds=[0,1,2,3], got {seeds!r}")
    values = list(seeds)
    if not values:
        raise ConfigError("seeds: empty list; give at least one seed, e.g. seeds=[0]")
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ConfigError(f"seeds: must be integers, got {bad[0]!r}")
    duplicates = sorted({s for s in values if values.count(s) > 1})
    if duplicates:
        raise ConfigError(f"seeds: seed {duplicates[0]} is listed twice (it would give the same image)")
    return [int(s) for s in values]


def check_number(value, key: str, positive_int: bool = False):
    if positive_int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def resolve_adapter(adapter) -> Path | None:
    """``adapter``: null, a LoRA weights file, a folder holding ``pytorch_lora_weights.safetensors``, or a training
    run folder holding ``lora/pytorch_lora_weights.safetensors``. Returns the weights file."""
    if adapter is None or adapter == "":
        return None
    if not isinstance(adapter, str):
        raise ConfigError(f"adapter: must be a path, got {adapter!r}")
    path = Path(adapter).expanduser()
    if not path.exists():
        raise ConfigError(f"adapter: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"adapter: {path} is not a .safetensors LoRA file")
        return Path(os.path.abspath(path))
    for candidate in (path / LORA_WEIGHT_NAME, path / "lora" / LORA_WEIGHT_NAME):
        if candidate.is_file():
            return Path(os.path.abspath(candidate))  # absolute, so index.jsonl says which file was used
    hint = ""
    if (path / "unet").is_dir():
        hint = " (this run fine-tuned the full UNet: its weights are in unet/, not a LoRA)"
    elif (path / "checkpoints").is_dir():
        hint = " (a run folder gets lora/ only when training ends)"
    raise ConfigError(f"adapter: {path} lacks {LORA_WEIGHT_NAME} (looked in {path} and {path / 'lora'}){hint}")


def resolve_device(name):
    import torch

    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


# ---------------------------------------------------------------------------------------------------- LoRA
def build_pipeline(backbone):
    """A stock ``StableDiffusionPipeline`` over the backbone's own modules (shared, not copied)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder,
                                   tokenizer=backbone.tokenizer, unet=backbone.unet,
                                   scheduler=backbone.sample_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


class _LoraLoadLog(logging.Handler):
    """While diffusers loads a LoRA: drop its messages that are expected here or that repeat an exception we report
    as one line, and keep its warnings about unexpected / missing LoRA keys (a partially loaded adapter)."""

    DROP = ("No LoRA keys associated to",)  # a UNet-only LoRA has no text-encoder keys: expected
    DROP_CONTAINING = (" was unsuccessful with the following error",)  # re-raised, reported by us as one line
    KEEP = ("Loading adapter weights from state_dict led to",)

    def __init__(self):
        super().__init__(logging.WARNING)
        self.problems: list[str] = []

    def silencer(self, record: logging.LogRecord) -> bool:
        """A filter for diffusers' own handlers: False drops the record."""
        message = record.getMessage()
        return not (message.startswith(self.DROP) or any(s in message for s in self.DROP_CONTAINING)
                    or message.startswith(self.KEEP))

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.KEEP):
            self.problems.append(message)

    @contextmanager
    def attached(self):
        library = logging.getLogger("diffusers")
        handlers = list(library.handlers)
        for handler in handlers:
            handler.addFilter(self.silencer)
        library.addHandler(self)
        try:
            yield self
        finally:
            library.removeHandler(self)
            for handler in handlers:
                handler.removeFilter(self.silencer)


def _short(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" + the first reason
        text = f"{text} {lines[1]}"
    return text if len(text) <= limit else text[:limit] + " ..."


# Keys of the backbone node that identify the base weights (dtype or resolution may change between train and use).
IDENTITY_KEYS = ("_target_", "pretrained_model_name_or_path", "revision", "variant", "seed")


def run_backbone(weights: Path) -> dict | None:
    """The backbone node of the training run that exported ``weights`` (``<run>/lora/<file>``), if recorded."""
    from omegaconf import OmegaConf

    config = weights.parent.parent / "config.yaml"
    if weights.parent.name != "lora" or not config.is_file():
        return None
    try:
        node = OmegaConf.load(config).get("backbone")
        return OmegaConf.to_container(node, resolve=False) if node is not None else None
    except Exception:  # an unreadable config.yaml only costs the hint
        return None


def describe_backbone(node: dict) -> str:
    parts = [f"backbone={node.get('name', '?')}"]
    parts += [f"backbone.{k}={node[k]}" for k in IDENTITY_KEYS[1:] if node.get(k) is not None]
    return " ".join(parts)


def check_same_base(weights: Path, backbone_cfg: DictConfig) -> None:
    """Warn when the run that trained the adapter used other base weights than the ones we generate with."""
    from omegaconf import OmegaConf

    trained_on = run_backbone(weights)
    if not trained_on:
        return
    ours = OmegaConf.to_container(backbone_cfg, resolve=True)
    differs = [k for k in IDENTITY_KEYS if str(trained_on.get(k)) != str(ours.get(k))]
    if differs:
        print(f"warning: adapter {weights} was trained on {describe_backbone(trained_on)}, generating with "
              f"{describe_backbone(ours)} (differs in backbone.{differs[0]})", file=sys.stderr)


def load_adapter(backbone, weights: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME):
    """Load a diffusers-format LoRA file into the backbone's UNet (and text encoder, if the file has keys for it)
    with stock ``StableDiffusionPipeline.load_lora_weights``, then set its weight to ``scale``.

    The backbone's modules are shared with the returned pipeline, so ``backbone.unet_forward`` (and therefore
    ``sample_images``) runs with the adapter. A file that does not fit the backbone raises ``ConfigError``.
    """
    weights = Path(weights)
    pipe = build_pipeline(backbone)
    log = _LoraLoadLog()
    with log.attached():
        try:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name)
        except AlignmentError:
            raise
        except Exception as err:  # corrupt file, keys or shapes of another architecture (ValueError, RuntimeError)
            hint = ""
            if "size mismatch" in str(err) or "state_dict" in str(err):
                trained_on = run_backbone(weights)
                hint = (f" (it was trained on {describe_backbone(trained_on)})" if trained_on else
                        " (a LoRA loads only into the model it was trained on)")
            raise ConfigError(f"adapter: cannot load {weights} into backbone {backbone.name!r}{hint}: "
                              f"{_short(err)}") from err
    if log.problems:
        raise ConfigError(f"adapter: {weights} does not fit backbone {backbone.name!r}: "
                          f"{_short(ValueError(log.problems[0]))}")
    loaded = pipe.get_list_adapters()
    if not any(adapter_name in names for names in loaded.values()):
        raise ConfigError(f"adapter: {weights} holds no LoRA weights that match backbone {backbone.name!r}")
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return pipe


# ---------------------------------------------------------------------------------------------------- output
def save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


save_text = atomic_write_text  # (text, path): reports, manifests, index.jsonl


# ---------------------------------------------------------------------------------------------------- main
def generate(cfg: DictConfig) -> dict:
    import torch

    from alignment.config import instantiate_checked
    from alignment.sampling.sample import image_grid, sample_images, to_pil

    # Every cheap check before the model is built.
    prompts = load_prompts(cfg.get("prompts"), cfg.get("prompt"))
    seeds = check_seeds(cfg.get("seeds"))
    weights = resolve_adapter(cfg.get("adapter"))
    lora_scale = check_number(cfg.get("lora_scale"), "lora_scale")
    steps = check_number(cfg.get("num_inference_steps"), "num_inference_steps", positive_int=True)
    guidance = check_number(cfg.get("guidance_scale"), "guidance_scale")
    batch_size = check_number(cfg.get("batch_size"), "batch_size", positive_int=True)
    negative_prompt = cfg.get("negative_prompt")
    negative_prompt = "" if negative_prompt is None else str(negative_prompt)
    device = resolve_device(cfg.get("device"))
    if not cfg.get("out_dir"):
        raise ConfigError("out_dir: must be a folder path")
    out_dir = Path(str(cfg.out_dir)).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir: {out_dir} exists and is not a folder")

    backbone = instantiate_checked(cfg.backbone, "backbone")
    if weights is not None:
        load_adapter(backbone, weights, scale=lora_scale)
        check_same_base(weights, cfg.backbone)
    backbone.to(device).eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # a run that dies part-way leaves no index describing it
    jobs = [(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
    grid_images, records = [], []
    base = {"adapter": str(weights) if weights is not None else None,
            "lora_scale": lora_scale if weights is not None else None, "steps": steps, "guidance": guidance,
            "negative_prompt": negative_prompt, "backbone": backbone.name}
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        pixels = sample_images(backbone, [p for _, p, _ in batch], [s for _, _, s in batch],
                               num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative_prompt)
        for (i, prompt, seed), image in zip(batch, to_pil(pixels)):
            name = image_name(i, seed)
            save_png(image, out_dir / name)
            records.append({"prompt_index": i, "prompt": prompt, "seed": seed, "file": name, **base})
            if cfg.get("grid") and i < GRID_MAX_ROWS:
                grid_images.append(image)
        if len(jobs) > batch_size:
            print(f"generate: {min(start + batch_size, len(jobs))}/{len(jobs)} images", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Re-running into the same folder: drop images and the grid of an earlier run that this run did not write.
    written = {r["file"] for r in records}
    for stale in out_dir.iterdir():
        if stale.is_file() and IMAGE_PATTERN.match(stale.name) and stale.name not in written:
            stale.unlink()
    grid_path = out_dir / GRID_NAME
    if grid_images:
        save_png(image_grid(grid_images, columns=len(seeds)), grid_path)
    else:
        grid_path.unlink(missing_ok=True)
    save_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), out_dir / INDEX_NAME)

    grid_note = ""
    if grid_images:
        grid_note = f"; grid {grid_path}" + (f" (first {GRID_MAX_ROWS} prompts)" if len(prompts) > GRID_MAX_ROWS
                                             else "")
    adapter_note = f" with adapter {weights} (scale {lora_scale:g})" if weights is not None else ""
    print(f"done: {len(records)} images ({len(prompts)} prompt(s) x {len(seeds)} seed(s)){adapter_note} in "
          f"{out_dir}; index {out_dir / INDEX_NAME}{grid_note}")
    return {"out_dir": str(out_dir), "images": len(records), "index": str(out_dir / INDEX_NAME),
            "grid": str(grid_path) if grid_images else None}


@entry_point("generate")
def main(cfg: DictConfig):
    return generate(cfg)


if __name__ == "__main__":
    main()
