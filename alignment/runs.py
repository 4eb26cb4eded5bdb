"""A trained model as files: what a training run exported, and putting it onto a backbone
(docs/contract.md#run-folders).

A run folder holds whatever its method trained, in standard formats:

    <run>/lora/pytorch_lora_weights.safetensors   a LoRA adapter (diffusers' format; stock load_lora_weights reads it)
    <run>/unet/                                   a full UNet (diffusers layout, safetensors)
    <run>/conditioner/                            a conditioner (alignment.conditioning: config + safetensors)
    <run>/config.yaml                             the composed config (which base weights it was trained on)

``resolve_model`` turns a ``models.<name>`` entry of ``alignment.generate`` / ``alignment.evaluate`` (``{run, adapter,
lora_scale, lan}``, a path, or null for the base model) into a ``ModelSpec`` with every file resolved and hashed,
before any model is built; ``model_loaded(backbone, spec)`` applies it to a backbone for the length of a ``with``
block and yields a ``LoadedModel`` (its conditioner, the base model as LAN's target, and ``sample``), leaving the
backbone exactly as it was afterwards.

Inference settings a method recommends travel with its runs: ``method.inference`` of a run's ``config.yaml``
(HG-DPO: ``{lora_scale: 0.5, lan: false}``) is the default ``lora_scale`` / ``lan`` of a model given by that run
folder; an explicit value always wins, and a LoRA file alone (no run folder) records nothing (1.0 / false).
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
MODEL_KEYS = ("run", "adapter", "lora_scale", "lan")
ADAPTER_NAME = "lora"
UNET_DIR, CONDITIONER_DIR, LORA_DIR = "unet", "conditioner", "lora"
# Keys of the backbone node that identify the base weights (dtype or resolution may change between train and use).
IDENTITY_KEYS = ("_target_", "pretrained_model_name_or_path", "revision", "variant", "seed")
RUN_CONFIG = "config.yaml"


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
    lan: bool = False                    # sample with latent adaptive normalisation against the base model

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
                "conditioner_sha256": self.conditioner_sha256, "lan": self.lan}

    def identity(self) -> dict:
        """What defines this model's outputs (hashes, not paths: a copied run gives the same images). ``lan`` is
        present only when on, so the image-cache keys of models sampled without LAN are the ones they always had."""
        identity = {"adapter_sha256": self.adapter_sha256, "lora_scale": self.lora_scale if self.adapter else None,
                    "unet_sha256": self.unet_sha256, "conditioner_sha256": self.conditioner_sha256}
        if self.lan:
            identity["lan"] = True
        return identity


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


def recorded_inference(folder: Path | None, key: str) -> dict:
    """The inference settings the training run in ``folder`` recorded: ``method.inference`` of its config.yaml (a
    method's paper setting, e.g. HG-DPO samples at LoRA scale 0.5), as ``{"lora_scale": float, "lan": bool}`` with
    only the keys it sets; empty for a folder that is no run folder or whose method records none."""
    from alignment.config import boolean, number

    config = folder / RUN_CONFIG if folder is not None else None
    if config is None or not config.is_file():
        return {}
    try:
        node = OmegaConf.select(OmegaConf.load(config), "method.inference")
    except Exception as err:  # noqa: BLE001 - a broken config.yaml: its recorded settings cannot be known
        raise ConfigError(f"{key}: cannot read method.inference from {config}: {first_line(err)}") from None
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key}: {config} method.inference must be a mapping {{lora_scale, lan}}, got {node!r}")
    recorded = {}
    if node.get("lora_scale") is not None:
        recorded["lora_scale"] = number(node.lora_scale, f"{key}: {config} method.inference.lora_scale")
    if node.get("lan") is not None:
        recorded["lan"] = boolean(node.lan, f"{key}: {config} method.inference.lan")
    return recorded


def run_folder_of(path) -> Path | None:
    """The training run folder a model path names (a folder holding config.yaml), else None: a LoRA file or a
    ``lora/`` folder alone carries no recorded inference settings."""
    if not isinstance(path, str) or not path:
        return None
    folder = Path(path).expanduser()
    return folder if folder.is_dir() and (folder / RUN_CONFIG).is_file() else None


def settle_inference(spec: ModelSpec, lora_scale: float | None, lan: bool | None, folder: Path | None) -> ModelSpec:
    """``spec``'s LoRA scale and LAN switch: the explicit value, else what the run in ``folder`` recorded, else
    1.0 / false. LAN on the base model is sampling against itself, i.e. plain sampling: recorded as off."""
    recorded = recorded_inference(folder, spec.key)
    spec.lora_scale = lora_scale if lora_scale is not None else recorded.get("lora_scale", 1.0)
    spec.lan = (lan if lan is not None else recorded.get("lan", False)) and not spec.is_base
    return spec


def resolve_run(run, name: str, key: str, lora_scale: float | None = None, lan: bool | None = None) -> ModelSpec:
    """Everything a run folder exported, hashed; ``lora_scale`` / ``lan`` None: the run's recorded setting."""
    if not isinstance(run, str) or not run:
        raise ConfigError(f"{key}: must be the path of a training run folder, got {run!r}")
    folder = Path(run).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder")
    spec = ModelSpec(name=name, run=folder.absolute(), key=key)
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
    return settle_inference(spec, lora_scale, lan, folder)


def resolve_path(path, name: str, key: str, lora_scale: float | None = None, lan: bool | None = None) -> ModelSpec:
    """A model given by one path (``key`` names it in errors): null (the base model), a run folder that exported a
    UNet or a conditioner (everything it exported), or a LoRA file / folder / run folder with ``lora/``.
    ``lora_scale`` / ``lan`` None: what a run folder recorded (``recorded_inference``), else 1.0 / false."""
    if isinstance(path, str) and path and is_run_folder(path):
        return resolve_run(path, name, key, lora_scale, lan)
    weights = resolve_adapter(path, key)
    spec = ModelSpec(name=name, adapter=weights, key=key,
                     adapter_sha256=file_sha256(weights) if weights is not None else None)
    return settle_inference(spec, lora_scale, lan, run_folder_of(path))


def resolve_model(entry, name: str, key: str, lan: bool | None = None) -> ModelSpec:
    """A ``models.<name>`` entry: null (the base model), a path (see ``resolve_path``), or a mapping
    ``{run, adapter, lora_scale, lan}`` (``run`` loads everything the run exported; ``adapter`` only a LoRA).
    ``lan``: the default of an entry that does not set its own (None: the run's recorded setting, else off)."""
    from alignment.config import boolean, number

    if entry is None or isinstance(entry, str):
        return resolve_path(entry, name, key, lan=lan)
    if isinstance(entry, DictConfig):
        entry = OmegaConf.to_container(entry, resolve=True)
    elif not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping {{run, adapter, lora_scale, lan}} or a path, got {entry!r}")
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (accepted: {', '.join(MODEL_KEYS)})")
    scale = entry.get("lora_scale")
    scale = None if scale is None else number(scale, f"{key}.lora_scale")
    if entry.get("lan") is not None:
        lan = boolean(entry["lan"], f"{key}.lan")
    if entry.get("run") not in (None, ""):
        if entry.get("adapter") not in (None, ""):
            raise ConfigError(f"{key}: set run (everything a run exported) or adapter (a LoRA file), not both")
        return resolve_run(entry["run"], name, f"{key}.run", scale, lan)
    weights = resolve_adapter(entry.get("adapter"), f"{key}.adapter")
    spec = ModelSpec(name=name, adapter=weights, key=f"{key}.adapter",
                     adapter_sha256=file_sha256(weights) if weights is not None else None)
    return settle_inference(spec, scale, lan, run_folder_of(entry.get("adapter")))


def is_run_folder(path: str) -> bool:
    """A training run folder that exported more than a LoRA (a full UNet or a conditioner)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / "config.yaml").is_file() and (
        (folder / UNET_DIR).is_dir() or (folder / CONDITIONER_DIR).is_dir())


def parse_models(node, key: str = "models", lan: bool | None = None) -> dict[str, ModelSpec]:
    """The ``models`` mapping: name -> entry (see ``resolve_model``); at least one model. ``lan``: the top-level
    default for entries that do not set their own."""
    if not isinstance(node, DictConfig) or len(node) == 0:
        raise ConfigError(f"{key} must map at least one model name to {{run, adapter, lora_scale, lan}}, got "
                          f"{OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
    models: dict[str, ModelSpec] = {}
    for name in node:
        name = str(name)
        if not MODEL_NAME.match(name):
            raise ConfigError(f"{key}.{name}: a model name may hold only letters, digits, '_', '.' and '-' "
                              f"(it names the image folder)")
        models[name] = resolve_model(node[name], name, f"{key}.{name}", lan)
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


class LoadedModel:
    """A model applied to the backbone, for the length of ``model_loaded``'s block: its conditioner, the base model
    (LAN's target) and ``sample``, the one sampling path generate and evaluate share."""

    def __init__(self, backbone, spec: ModelSpec, conditioner=None, base_unet=None, pipe=None):
        self.backbone = backbone
        self.spec = spec
        self.conditioner = conditioner
        self.base_unet = backbone.unet if base_unet is None else base_unet  # the backbone's own UNet
        self.pipe = pipe  # the pipeline that loaded the LoRA (it switches every LoRA layer off and on), if any

    @property
    def lan(self) -> bool:
        return self.spec.lan

    @property
    def extras(self) -> tuple[str, ...]:
        """The per-prompt extras the conditioner reads (none without one)."""
        return tuple(getattr(self.conditioner, "extras", ()) or ())

    @contextmanager
    def target(self) -> Iterator[object]:
        """The base model for the block, as LAN's target: yields the backbone's own UNet (the one a full UNet
        replaced) with every LoRA layer off (UNet and text encoder); the model is itself again afterwards, even if
        the block raises. Toggled rather than copied: a copy of the UNet would double its memory."""
        if self.pipe is None:
            yield self.base_unet
            return
        self.pipe.disable_lora()
        try:
            yield self.base_unet
        finally:
            self.pipe.enable_lora()

    def sample(self, prompts: list[str], seeds: list[int], extras: dict | None = None, *, num_inference_steps: int,
               guidance_scale: float, negative_prompt: str, sampler: str, safety=None, reward_guidance=None,
               masks=None):
        """Pixels in [0, 1] of one image per (prompt, seed): ``sample_images``, or with ``spec.lan``
        ``sample_with_lan`` against ``target`` (the base model conditioned by the text alone). ``safety``: Safe
        Latent Diffusion's settings (``alignment.sampling.sld``; None: off; not with LAN). ``reward_guidance``: an
        ``alignment.sampling.reward_guidance.RewardGuidance`` (None: off; not with LAN), with ``masks`` (one per
        image, pixel space, or None: M = 1).

        ``extras`` (name -> one value per image, e.g. LiVO's ``value``) splits the batch: the images without any
        extra (every value None) are sampled in a batch of their own, apart from those with one, and the pixels come
        back in the order given (``extras_groups``). So an image without a value never shares a UNet call with
        valued ones (whose conditioning is 1 + 77 tokens long), and gets exactly the base model's conditioning. The
        split depends on ``extras`` alone, not on whether this model's conditioner reads them: callers pass every
        model the same per-image extras, so a value-free image of a LiVO model and of the base come from batches of
        the same composition (bit-identical images, not just equal up to a batch's float noise)."""
        import torch

        groups = extras_groups(extras, len(prompts))
        more = {} if safety is None else {"safety": safety}
        if reward_guidance is not None:
            more.update(reward_guidance=reward_guidance, masks=masks)
        if len(groups) == 1:
            return self._sample(list(prompts), list(seeds), extras, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, negative_prompt=negative_prompt, sampler=sampler,
                                **more)
        out = None
        for rows in groups:
            part = self._sample([prompts[i] for i in rows], [seeds[i] for i in rows],
                                {name: [values[i] for i in rows] for name, values in extras.items()},
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                negative_prompt=negative_prompt, sampler=sampler,
                                **{**more, **({"masks": masks[rows]} if masks is not None else {})})
            if out is None:
                out = part.new_empty((len(prompts), *part.shape[1:]))
            out[torch.as_tensor(rows, device=part.device)] = part
        return out

    def _sample(self, prompts: list[str], seeds: list[int], extras: dict | None, **settings):
        from alignment.sampling import sample as sampling
        from alignment.sampling.lan import sample_with_lan

        options = dict(conditioner=self.conditioner, extras=extras, **settings)
        guidance, masks = options.pop("reward_guidance", None), options.pop("masks", None)
        if guidance is not None:  # docs/methods.md#reward-guidance-baseline
            if self.lan or options.get("safety") is not None:
                raise ValueError(f"model {self.spec.name!r}: reward guidance is not combined with LAN or SLD")
            return guidance.sample(self.backbone, prompts, seeds, masks=masks, **options)
        if not self.lan:
            return sampling.sample_images(self.backbone, prompts, seeds, **options)
        if options.get("safety") is not None:
            raise ValueError(f"model {self.spec.name!r}: Safe Latent Diffusion is not combined with LAN")
        return sample_with_lan(self.backbone, prompts, seeds, target_unet=self.target, **options)


def extras_groups(extras: dict | None, count: int) -> list[list[int]]:
    """The rows of one sampling batch as groups sampled apart, each in order: ``[all rows]`` when every row has
    some extra or none has any, else ``[rows without any extra, rows with one]`` (an extra is a value that is not
    None)."""
    for name, values in (extras or {}).items():
        if len(values) != count:
            raise ValueError(f"extras {name!r}: {len(values)} values for {count} images")
    plain = [i for i in range(count) if all(values[i] is None for values in (extras or {}).values())]
    if len(plain) in (0, count):
        return [list(range(count))]
    kept = set(plain)
    return [plain, [i for i in range(count) if i not in kept]]


@contextmanager
def model_loaded(backbone, spec: ModelSpec) -> Iterator[LoadedModel]:
    """Apply ``spec`` to ``backbone`` (UNet swapped in, LoRA loaded at ``lora_scale``, conditioner built) for the
    block; yields a ``LoadedModel``. Afterwards the backbone is the base model again."""
    from alignment.conditioning import load_conditioner

    original_unet, pipe = backbone.unet, None
    try:
        if spec.unet is not None:
            backbone.unet = load_unet(backbone, spec.unet, spec.key)
        if spec.adapter is not None:
            pipe = load_adapter(backbone, spec.adapter, scale=spec.lora_scale,
                                adapter_name=f"m_{spec.name}".replace(".", "_"),  # peft: no "." in a module name
                                key=spec.key)
            backbone.unet.to(backbone.device)
        conditioner = None
        if spec.conditioner is not None:
            conditioner = load_conditioner(spec.conditioner, backbone, spec.key)
        yield LoadedModel(backbone, spec, conditioner, base_unet=original_unet, pipe=pipe)
    finally:
        if pipe is not None:
            pipe.unload_lora_weights()  # exactly the base weights again: the LoRA is never merged
        backbone.unet = original_unet
