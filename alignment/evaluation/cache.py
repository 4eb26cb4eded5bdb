"""The generation cache: each model's images on disk, reused whenever what defines them is unchanged.

Layout (``image_dir``; point several evaluations at one folder to share their generations)::

    <image_dir>/<model>/<prompt_index:05d>_seed<seed>.png
    <image_dir>/<model>/manifest.json

``manifest.json`` records, per image file, its prompt text, its seed and the key of its *settings*: the backbone
config node (resolved), the model's identity (SHA-256 of its LoRA file and ``lora_scale``, of an exported UNet and
of a conditioner, and ``lan: true`` for a model sampled with HG-DPO's latent adaptive normalisation —
``alignment.runs.ModelSpec.identity``; ``lan`` is absent when off, so the keys of images cached before LAN existed
are unchanged), the sampler (``ddim`` or ``dpmsolver``: DDIM and DPMSolver images never share a key), steps,
guidance scale and negative prompt (``settings`` maps each key to these values, with the model's paths for reading).
An image is reused only when its file exists and its manifest entry matches the prompt, the seed and the current
settings key; otherwise it is generated again. So a second evaluation that changes only scorers or metrics generates nothing, a
changed adapter file (other hash), ``lora_scale`` or ``lan`` regenerates that model's images (``lora_scale`` is the
scale used: a run's recorded ``method.inference.lora_scale`` when none is given), and a changed prompt file
regenerates the prompts whose text changed at their index. The adapter's path is not part of the key: a moved or
copied LoRA file with the same bytes reuses the images.

A model whose conditioner reads extras (LiVO's ``value``) also has, per image, the extras it was sampled with in
its manifest entry (``"extras": {"value": ...}``): an image wanted with another value is generated again. With the
value retriever on (``retriever``), that is the value of the image itself — the row's or the retrieved value after
the per-image draw for bias values (``alignment.evaluation.plan``) — so changing the retriever, its classifier, its
seed or ``bias_probability`` regenerates exactly the images whose value changes and reuses the others (an image is
defined by its value, not by how the value was chosen); switching the retriever off reverts to the prompt file's
value for every seed. The retriever's settings are recorded in ``metrics.json`` (``config.retriever``).

Images are generated in batches of missing images; a batch's composition changes float results by ~1e-6 at most
(below one uint8 level almost always). Every batch is split into images with and without an extra, for every model
alike (``LoadedModel.sample``): a LiVO model's value-free images are sampled as the base model's are (bit-identical
when both generate the same images in one evaluation). The manifest is rewritten atomically after every batch, so
an interrupted run keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from alignment.evaluation.plan import Plan
from alignment.files import atomic_write_text, image_name, save_png
from alignment.runs import ModelSpec

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def generation_settings(plan: Plan, spec: ModelSpec, backbone_node: dict) -> dict:
    """Everything besides prompt and seed that defines a model's images (the cache key is a hash of it, minus
    the adapter's path)."""
    from alignment.sampling.sample import sampler_identity

    identity = {k: v for k, v in spec.identity().items() if v is not None or k in ("adapter_sha256", "lora_scale")}
    return {"backbone": backbone_node, **identity, "sampler": sampler_identity(plan.sampler),
            "num_inference_steps": plan.num_inference_steps, "guidance_scale": plan.guidance_scale,
            "negative_prompt": plan.negative_prompt}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ModelImages:
    """One model's folder of cached images and its manifest. ``extras``: the per-prompt values of the extras the
    model's conditioner reads; ``image_extras``: ``{(prompt_index, seed): {name: value}}``, per-image values that
    replace them (the retriever's values, ``Plan.image_extras``). Either is part of each image's manifest entry:
    another value regenerates the image."""

    def __init__(self, image_dir: Path, spec: ModelSpec, settings: dict, extras: dict[str, list] | None = None,
                 image_extras: dict[tuple[int, int], dict] | None = None):
        self.spec = spec
        self.folder = Path(image_dir) / spec.name
        self.settings = settings
        self.extras = dict(extras or {})
        self.image_extras = image_extras
        self.key = settings_key(settings)
        self.manifest = self._load_manifest()

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def _load_manifest(self) -> dict:
        empty = {"version": MANIFEST_VERSION, "model": self.spec.name, "settings": {}, "images": {}}
        if not self.manifest_path.is_file():
            return empty
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION or not isinstance(data.get("images"), dict):
                raise ValueError("unknown layout")
            data.setdefault("settings", {})
            return data
        except (OSError, ValueError, AttributeError) as err:
            print(f"warning: {self.manifest_path} is unreadable ({err}); regenerating the images of model "
                  f"{self.spec.name!r}", file=sys.stderr)
            return empty

    def path(self, prompt_index: int, seed: int) -> Path:
        return self.folder / image_name(prompt_index, seed)

    def image_extra(self, prompt_index: int, seed: int) -> dict:
        """The extras image ``(prompt_index, seed)`` is sampled with (empty: none)."""
        if self.image_extras is not None:
            return dict(self.image_extras.get((prompt_index, seed), {}))
        return {name: values[prompt_index] for name, values in self.extras.items()}

    def entry(self, prompt_index: int, prompt: str, seed: int) -> dict:
        """What defines image ``(prompt_index, seed)``: its prompt, seed, settings key and extras (if any)."""
        entry = {"prompt": prompt, "seed": seed, "settings": self.key}
        extra = self.image_extra(prompt_index, seed)
        if extra:
            entry["extras"] = extra
        return entry

    def is_cached(self, prompt_index: int, prompt: str, seed: int) -> bool:
        entry = self.manifest["images"].get(image_name(prompt_index, seed))
        return entry == self.entry(prompt_index, prompt, seed) and self.path(prompt_index, seed).is_file()

    def missing(self, jobs: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
        return [job for job in jobs if not self.is_cached(*job)]

    def record(self, jobs: list[tuple[int, str, int]]) -> None:
        """Mark ``jobs`` as generated with the current settings and rewrite the manifest atomically."""
        for i, prompt, seed in jobs:
            self.manifest["images"][image_name(i, seed)] = self.entry(i, prompt, seed)
        used = {entry.get("settings") for entry in self.manifest["images"].values()}
        settings = {k: v for k, v in self.manifest["settings"].items() if k in used}
        paths = {k: v for k, v in self.spec.describe().items() if k in ("run", "adapter", "unet", "conditioner")}
        settings[self.key] = {**self.settings, **paths}
        self.manifest["settings"] = settings
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                          self.manifest_path)


def generate_missing(plan: Plan, caches: dict[str, ModelImages], build_backbone: Callable, backbone_cfg,
                     device) -> dict[str, dict]:
    """Generate every missing image of every model; the backbone is built only when something is missing.

    Each model is applied to the backbone with ``alignment.runs.model_loaded`` (its LoRA at ``lora_scale`` through
    diffusers' ``load_lora_weights``, an exported UNet, a conditioner), its images sampled with ``sample_images``, or
    ``sample_with_lan`` against the base model when its ``lan`` is on (``LoadedModel.sample``; image
    ``(prompt, seed)`` starts from the noise of ``torch.Generator().manual_seed(seed)``, the same for every model),
    then the backbone is the base model again. Every model is given the extras any compared model's conditioner
    reads (``Plan.image_extras(plan.extra_names)``: the prompt file's fields, the retriever's values), so its batches
    are split into images with and without one exactly as the others' are; a conditioner reads those it knows.
    Returns ``{model: {"generated": n, "reused": m}}``.
    """
    import torch

    from alignment.runs import check_same_base, model_loaded
    from alignment.sampling.sample import to_pil

    jobs = plan.jobs()
    todo = {name: cache.missing(jobs) for name, cache in caches.items()}
    counts = {name: {"generated": len(todo[name]), "reused": len(jobs) - len(todo[name])} for name in caches}
    if not any(todo.values()):
        return counts
    names = plan.extra_names
    image_extras = plan.image_extras(names) if names else {}
    backbone = build_backbone()
    backbone.to(device).eval()
    for name, missing in todo.items():
        if not missing:
            continue
        cache, spec = caches[name], caches[name].spec
        if not spec.is_base:
            check_same_base(spec, backbone_cfg)
        cache.folder.mkdir(parents=True, exist_ok=True)
        with model_loaded(backbone, spec) as model:
            for start in range(0, len(missing), plan.batch_size):
                batch = missing[start:start + plan.batch_size]
                # the model's own extras are what its manifest entries record; the others only split the batch
                given = [{**image_extras.get((i, seed), {}), **cache.image_extra(i, seed)} for i, _, seed in batch]
                extras = {extra: [g.get(extra) for g in given] for extra in dict.fromkeys(n for g in given for n in g)}
                pixels = model.sample([p for _, p, _ in batch], [s for _, _, s in batch], extras,
                                      num_inference_steps=plan.num_inference_steps,
                                      guidance_scale=plan.guidance_scale, negative_prompt=plan.negative_prompt,
                                      sampler=plan.sampler)
                for (i, _, seed), image in zip(batch, to_pil(pixels)):
                    save_png(image, cache.path(i, seed))
                cache.record(batch)
                if len(missing) > plan.batch_size:
                    print(f"generate {name}: {min(start + plan.batch_size, len(missing))}/{len(missing)} images",
                          file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    del backbone
    return counts
