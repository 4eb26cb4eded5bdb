"""A trained model as files: what a training run exported, and putting it onto a backbone
(docs/contract.md#run-folders).

A run folder holds whatever its method trained, in standard formats:

    <run>/lora/pytorch_lora_weights.safetensors   a LoRA adapter (diffusers' format; stock load_lora_weights reads it)
    <run>/unet/                                   a full UNet (diffusers layout, safetensors)
    <run>/conditioner/                            a conditioner (alignment.conditioning: config + safetensors)
    <run>/config.yaml                             the composed config (which base weights it was trained on)

``resolve_model`` turns a ``models.<name>`` entry of ``alignment.generate`` / ``alignment.evaluate`` (``{run, adapter,
lora_scale}``, a path, or null for the base model) into a ``ModelSpec`` with every file resolved and hashed, before
any model is built; ``model_loaded(backbone, spec)`` applies it to a backbone for the length of a ``with`` block
and yields the conditioner (or None), leaving the backbone exactly as it was afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from alignment.errors import AlignmentError, ConfigError
from alignment.training.lora import LORA_WEIGHT_NAME

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a model's name is also its image folder's name
MODEL_KEYS = ("run", "adapter", "lora_scale")
ADAPTER_NAME = "lora"
UNET_DIR, CONDITIONER_DIR, LORA_DIR = "unet", "conditioner", "lora"
# Keys of the backbone node that identify the base weights (dtype or resolution may change between train and use).
IDENTITY_KEYS = ("_target_", "pretrained_model_name_or_path", "revision", "variant", "seed")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One digest over the files of a folder (names and bytes), e.g. an exported UNet or conditioner."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


@dataclass
class ModelSpec:
    """One model to sample from: the shared backbone with what a run exported (any of LoRA, UNet, conditioner)."""

    name: str
    adapter: Path | None = None          # LoRA weights file (absolute)
    adapter_sha256: str | None = None
    lora_scale: float = 1.0
    run: Path | None = None              # the run folder it came from, if any
    unet: Path | None = None             # full UNet folder
    unet_sha256: str | None = None
    conditioner: Path | None = None      # conditioner folder
    conditioner_sha256: str | None = None
    conditioner_extras: tuple[str, ...] = ()   # the per-prompt extras the conditioner reads
    key: str = "models"                  # the config key that named it (errors name it)

    @property
    def is_base(self) -> bool:
        return self.adapter is None and self.unet is None and self.conditioner is None

    @property
    def weights(self) -> Path | None:
        """The file or folder that names this model in messages."""
        return self.run or self.adapter or self.unet or self.conditioner

    def describe(self) -> dict:
        return {"run": str(self.run) if self.run else None,
                "adapter": str(self.adapter) if self.adapter else None, "adapter_sha256": self.adapter_sha256,
                "lora_scale": self.lora_scale if self.adapter else None,
                "unet": str(self.unet) if self.unet else None, "unet_sha256": self.unet_sha256,
                "conditioner": str(self.conditioner) if self.conditioner else None,
                "conditioner_sha256": self.conditioner_sha256}

    def identity(self) -> dict:
        """What defines this model's outputs (hashes, not paths: a copied run gives the same images)."""
        return {"adapter_sha256": self.adapter_sha256, "lora_scale": self.lora_scale if self.adapter else None,
                "unet_sha256": self.unet_sha256, "conditioner_sha256": self.conditioner_sha256}


# ------------------------------------------------------------------------------------------------ resolving
def resolve_adapter(adapter, key: str = "adapter") -> Path | None:
    """``adapter``: null, a LoRA weights file, a folder holding ``pytorch_lora_weights.safetensors``, or a training
    run folder holding ``lora/pytorch_lora_weights.safetensors``. Returns the weights file."""
    from alignment.config import existing_path

    path = existing_path(adapter, key, kind="any")
    if path is None:
        return None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{key}: {path} is not a .safetensors LoRA file")
        return path.absolute()
    for candidate in (path / LORA_WEIGHT_NAME, path / LORA_DIR / LORA_WEIGHT_NAME):
        if candidate.is_file():
            return candidate.absolute()  # absolute, so index.jsonl says which file was used
    hint = ""
    if (path / UNET_DIR).is_dir():
        hint = f" (this run fine-tuned the full UNet: its weights are in unet/, not a LoRA; use run={path})"
    elif (path / CONDITIONER_DIR).is_dir():
        hint = f" (this run exported a conditioner: use run={path})"
    elif (path / "checkpoints").is_dir():
        hint = " (a run folder gets lora/ only when training ends)"
    raise ConfigError(f"{key}: {path} lacks {LORA_WEIGHT_NAME} (looked in {path} and {path / LORA_DIR}){hint}")


def resolve_run(run, name: str, key: str, lora_scale: float = 1.0) -> ModelSpec:
    """Everything a run folder exported, hashed."""
    if not isinstance(run, str) or not run:
        raise ConfigError(f"{key}: must be the path of a training run folder, got {run!r}")
    folder = Path(run).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder")
    spec = ModelSpec(name=name, run=folder.absolute(), lora_scale=lora_scale, key=key)
    if (folder / LORA_DIR / LORA_WEIGHT_NAME).is_file():
        spec.adapter = (folder / LORA_DIR / LORA_WEIGHT_NAME).absolute()
        spec.adapter_sha256 = file_sha256(spec.adapter)
    if (folder / UNET_DIR).is_dir():
        spec.unet = (folder / UNET_DIR).absolute()
        spec.unet_sha256 = folder_sha256(spec.unet)
    if (folder / CONDITIONER_DIR).is_dir():
        from alignment.conditioning import exported_extras

        spec.conditioner = (folder / CONDITIONER_DIR).absolute()
        spec.conditioner_sha256 = folder_sha256(spec.conditioner)
        spec.conditioner_extras = exported_extras(spec.conditioner, key)
    if spec.is_base:
        hint = " (it is still training, or it was stopped before the end)" if (folder / "checkpoints").is_dir() else ""
        raise ConfigError(f"{key}: {folder} holds none of lora/, unet/ or conditioner/ — what a run exports when "
                          f"training ends{hint}")
    return spec


def resolve_path(path, name: str, key: str, lora_scale: float = 1.0) -> ModelSpec:
    """A model given by one path (``key`` names it in errors): null (the base model), a run folder that exported a
    UNet or a conditioner (everything it exported), or a LoRA file / folder / run folder with ``lora/``."""
    if isinstance(path, str) and path and is_run_folder(path):
        return resolve_run(path, name, key, lora_scale)
    weights = resolve_adapter(path, key)
    return ModelSpec(name=name, adapter=weights, lora_scale=lora_scale, key=key,
                     adapter_sha256=file_sha256(weights) if weights is not None else None)


def resolve_model(entry, name: str, key: str) -> ModelSpec:
    """A ``models.<name>`` entry: null (the base model), a path (see ``resolve_path``), or a mapping
    ``{run, adapter, lora_scale}`` (``run`` loads everything the run exported; ``adapter`` only a LoRA)."""
    from alignment.config import number

    if entry is None or isinstance(entry, str):
        return resolve_path(entry, name, key)
    if isinstance(entry, DictConfig):
        entry = OmegaConf.to_container(entry, resolve=True)
    elif not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping {{run, adapter, lora_scale}} or a path, got {entry!r}")
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (accepted: {', '.join(MODEL_KEYS)})")
    scale = entry.get("lora_scale", 1.0)
    scale = 1.0 if scale is None else number(scale, f"{key}.lora_scale")
    if entry.get("run") not in (None, ""):
        if entry.get("adapter") not in (None, ""):
            raise ConfigError(f"{key}: set run (everything a run exported) or adapter (a LoRA file), not both")
        return resolve_run(entry["run"], name, f"{key}.run", scale)
    weights = resolve_adapter(entry.get("adapter"), f"{key}.adapter")
    return ModelSpec(name=name, adapter=weights, lora_scale=scale, key=f"{key}.adapter",
                     adapter_sha256=file_sha256(weights) if weights is not None else None)


def is_run_folder(path: str) -> bool:
    """A training run folder that exported more than a LoRA (a full UNet or a conditioner)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / "config.yaml").is_file() and (
        (folder / UNET_DIR).is_dir() or (folder / CONDITIONER_DIR).is_dir())


def parse_models(node, key: str = "models") -> dict[str, ModelSpec]:
    """The ``models`` mapping: name -> entry (see ``resolve_model``); at least one model."""
    if not isinstance(node, DictConfig) or len(node) == 0:
        raise ConfigError(f"{key} must map at least one model name to {{run, adapter, lora_scale}}, got "
                          f"{OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
    models: dict[str, ModelSpec] = {}
    for name in node:
        name = str(name)
        if not MODEL_NAME.match(name):
            raise ConfigError(f"{key}.{name}: a model name may hold only letters, digits, '_', '.' and '-' "
                              f"(it names the image folder)")
        models[name] = resolve_model(node[name], name, f"{key}.{name}")
    return models


# ------------------------------------------------------------------------------------------------ base weights
def run_backbone(path: Path) -> dict | None:
    """The backbone node of the training run that exported ``path`` (a run folder, or a file/folder inside one)."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                node = OmegaConf.load(config).get("backbone")
                return OmegaConf.to_container(node, resolve=False) if node is not None else None
            except Exception:  # noqa: BLE001 - an unreadable config.yaml only costs the hint
                return None
    return None


def describe_backbone(node: dict) -> str:
    """``backbone=sd15 backbone.pretrained_model_name_or_path=...``: how to select these base weights."""
    parts = [f"backbone={node.get('name', '?')}"]
    parts += [f"backbone.{k}={node[k]}" for k in IDENTITY_KEYS[1:] if node.get(k) is not None]
    return " ".join(parts)


def check_same_base(spec: ModelSpec | Path, backbone_cfg) -> None:
    """Warn when the run that trained a model used other base weights than the ones we sample with."""
    path = spec.weights if isinstance(spec, ModelSpec) else Path(spec)
    trained_on = run_backbone(path) if path is not None else None
    if not trained_on:
        return
    ours = OmegaConf.to_container(backbone_cfg, resolve=True) if isinstance(backbone_cfg, DictConfig) \
        else dict(backbone_cfg)
    differs = [k for k in IDENTITY_KEYS if str(trained_on.get(k)) != str(ours.get(k))]
    if differs:
        print(f"warning: {path} was trained on {describe_backbone(trained_on)}, sampling with "
              f"{describe_backbone(ours)} (differs in backbone.{differs[0]})", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ loading
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


def first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" + the first reason
        text = f"{text} {lines[1]}"
    return text if len(text) <= limit else text[:limit] + " ..."


def load_adapter(backbone, weights: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME,
                 key: str = "adapter"):
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
            raise ConfigError(f"{key}: cannot load {weights} into backbone {backbone.name!r}{hint}: "
                              f"{first_line(err)}") from err
    if log.problems:
        raise ConfigError(f"{key}: {weights} does not fit backbone {backbone.name!r}: "
                          f"{first_line(ValueError(log.problems[0]))}")
    loaded = pipe.get_list_adapters()
    if not any(adapter_name in names for names in loaded.values()):
        raise ConfigError(f"{key}: {weights} holds no LoRA weights that match backbone {backbone.name!r}")
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return pipe


def load_unet(backbone, folder: Path, key: str):
    """A full UNet exported by a run (diffusers layout), in the backbone's weight dtype and device."""
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=backbone.weight_dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot load the UNet in {folder}: {first_line(err)}") from None
    if unet.config.in_channels != backbone.unet.config.in_channels or \
            unet.config.cross_attention_dim != backbone.unet.config.cross_attention_dim:
        raise ConfigError(f"{key}: the UNet in {folder} does not fit backbone {backbone.name!r} (in_channels "
                          f"{unet.config.in_channels}, cross_attention_dim {unet.config.cross_attention_dim})")
    return unet.to(backbone.device).requires_grad_(False).eval()


@contextmanager
def model_loaded(backbone, spec: ModelSpec) -> Iterator[object]:
    """Apply ``spec`` to ``backbone`` (UNet swapped in, LoRA loaded at ``lora_scale``, conditioner built) for the
    block; yields the conditioner or None. Afterwards the backbone is the base model again."""
    from alignment.conditioning import load_conditioner

    original_unet, pipe = backbone.unet, None
    try:
        if spec.unet is not None:
            backbone.unet = load_unet(backbone, spec.unet, spec.key)
        if spec.adapter is not None:
            pipe = load_adapter(backbone, spec.adapter, scale=spec.lora_scale, adapter_name=f"m_{spec.name}",
                                key=spec.key)
            backbone.unet.to(backbone.device)
        conditioner = None
        if spec.conditioner is not None:
            conditioner = load_conditioner(spec.conditioner, backbone, spec.key)
        yield conditioner
    finally:
        if pipe is not None:
            pipe.unload_lora_weights()  # exactly the base weights again: the LoRA is never merged
        backbone.unet = original_unet
