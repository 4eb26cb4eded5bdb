"""Image generation entry point: a backbone, optionally a trained model, prompts × seeds -> PNG files + index.

    python -m alignment.generate prompt="a red circle on a white background" seeds=[0,1,2,3]
    python -m alignment.generate prompts=parti.tsv adapter=outputs/dpo-sd15/2025-01-01_12-00-00 \\
        backbone=sd15 backbone.pretrained_model_name_or_path=/models/sd15 out_dir=images/dpo
    python -m alignment.generate prompts=p.txt +models.base=null +models.livo.run=outputs/livo-sd15/<date>
    python -m alignment.generate -m lora_scale=0,0.5,1 ...   # Hydra sweep, one folder per job
    python -m alignment.generate prompts=p.txt adapter=outputs/hg-dpo/<run> lan=true sampler=dpmsolver

The backbone is built from the same ``backbone`` config node that training uses. ``adapter`` (a LoRA file or a run
folder) or ``models.<name>`` entries (``{run, adapter, lora_scale, lan}``) say what to put on it: ``run`` loads
whatever the training run exported — LoRA, full UNet, conditioner (``alignment.runs``). A LoRA is read by diffusers'
own ``StableDiffusionPipeline.load_lora_weights`` (the file a stock pipeline reads is exactly what is sampled here)
and scaled by ``lora_scale``; null (the default) takes the scale the run recorded (``method.inference.lora_scale`` of
its config.yaml: HG-DPO samples at 0.5), else 1.0, so an HG-DPO run is sampled as the paper does unless told
otherwise. ``lan=true`` (HG-DPO's latent adaptive normalisation, ``alignment.sampling.lan``; null: the run's
``method.inference.lan``, else off) samples every model together with the base model from the same noise and gives
its latent the base latent's channel statistics after every step; on the base model itself that is plain sampling,
recorded as ``lan: false``. Sampling is the project's ``sample_images`` (or ``sample_with_lan``) with ``sampler``
(``ddim`` or ``dpmsolver``): image ``(prompt, seed)`` starts from the noise of ``torch.Generator().manual_seed(seed)``,
so the same seed gives the same starting noise for every model compared. ``index.jsonl`` records the LoRA scale and
the LAN switch actually used.
``sld.preset`` (weak | medium | strong | max; null: off) samples every model with Safe Latent Diffusion's negative
guidance away from ``sld.concept`` (``alignment.sampling.sld``; needs ``guidance_scale > 1``, not with LAN);
``index.jsonl`` records its settings (``sld``).
``reward_guidance.scorer`` (a scorer name or weighted sum, as ``method.reward``; null: off) samples every model with
Focus-N-Fix's reward-guidance baseline (``alignment.sampling.reward_guidance``,
docs/methods.md#reward-guidance-baseline): ``ε̂ = ε − λ sqrt(1 − ᾱ_t) clip(∇_{x_t} r(decode(x̂_0)) ⊙ M)`` at every
step, the mask ``M`` given (an image or a folder, as evaluate's ``metrics.change.mask``) or made by Focus-N-Fix's mask
pipeline (``heatmap`` / ``saliency``) from the unguided image of the same seed, then written to ``out_dir/masks/`` (a
rerun given that folder reads it and leaves it in place; not with LAN or SLD). The reward's scorers load before the
backbone. ``index.jsonl`` records its settings (``reward_guidance``) and, with a mask, each image's ``mask_fraction``.
A conditioner reads its per-image extras (e.g. LiVO's ``value``) from the prompt file's fields of the same name,
every seed of a row alike. With ``retriever`` set (``retriever=lexicon|zero_shot|chat``, ``alignment.retrieval.values``;
null: off) and a model whose conditioner reads ``value``, each image's value is the row's ``value`` field if it has
one, else the retriever's value for the prompt, then LiVO's per-image draw: a bias value is kept with probability
``retriever.bias_probability`` (0.5) by a draw fixed by the retriever's seed, the prompt and the image's seed (the
same for every model and every rerun), a toxicity value always (docs/methods.md#livo-inference). An image without a
value is sampled with the base conditioning, in a batch of its own (``LoadedModel.sample`` splits every batch into
value-free and valued images for every model alike), so it is pixel-identical to the base model's image of the same
seed. ``index.jsonl`` records the value used per image (``extras``) and the retriever's settings.
With ``prompt_filter.model`` set, a text classifier drops unsafe prompts first (``alignment.evaluation.prompt_filter``;
the kept prompts are renumbered in order, ``out_dir/prompt_filter.json`` lists the dropped ones and maps the kept
ones back to the file).

Output (``out_dir``, or ``out_dir/<model>`` per entry of ``models``): ``{prompt_index:05d}_seed{seed}.png`` per
image, ``index.jsonl`` (one line per image) and ``grid.png`` (one row per prompt, one column per seed). Every file
is written atomically; ``index.jsonl`` is removed at the start and written last, so when it exists it describes the
images of one complete run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from alignment.cli import entry_point
from alignment.config import resolve_device
from alignment.errors import ConfigError, DataError
from alignment.files import atomic_write_text, image_name, save_png
from alignment.runs import ADAPTER_NAME, load_adapter, resolve_adapter  # noqa: F401 - re-exported for scripts

INDEX_NAME = "index.jsonl"
FILTER_NAME = "prompt_filter.json"  # the safety filter's summary (kept / dropped prompts) when it is on
GRID_NAME = "grid.png"
MASK_DIR = "masks"  # reward guidance's masks made from the unguided images (white = guided), as evaluate reads them
GRID_MAX_ROWS = 64  # grid.png shows at most this many prompts (a PartiPrompts grid would not fit in memory)
IMAGE_PATTERN = re.compile(r"^\d{5,}_seed-?\d+\.png$")


# ------------------------------------------------------------------------------------------------ config checks
def load_prompts(prompts_file, prompt) -> list[str]:
    """Exactly one of ``prompts`` (a prompt file read by ``read_prompts``) or ``prompt`` (one string)."""
    return [record["prompt"] for record in load_prompt_records(prompts_file, prompt)]


def load_prompt_records(prompts_file, prompt) -> list[dict]:
    """``load_prompts`` keeping each prompt file row's other fields (extras a conditioner may read)."""
    from alignment.data.prompts import read_prompt_records

    if (prompts_file is None) == (prompt is None):
        which = "both are set" if prompts_file is not None else "neither is set"
        raise ConfigError(f"prompts / prompt: set exactly one of prompts=<prompt file> or prompt=<text> ({which})")
    if prompt is not None:
        if isinstance(prompt, (ListConfig, list, tuple, dict, DictConfig)):
            raise ConfigError("prompt: must be a single string (quote it if it holds commas: 'prompt=\"a, b\"'); "
                              "for several prompts use prompts=<file>")
        return [{"prompt": str(prompt).strip()}]
    if not isinstance(prompts_file, str) or not prompts_file.strip():
        raise ConfigError(f"prompts: must be the path of a prompt file (.txt/.jsonl/.json/.tsv/.csv), "
                          f"got {prompts_file!r}")
    try:
        return read_prompt_records(prompts_file)
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


def filter_prompts(node, records: list[dict]) -> tuple[list[dict], dict | None]:
    """The prompt safety filter (``prompt_filter``; off when its model is null): the kept rows, renumbered in
    order, and its summary (None when off)."""
    from alignment.evaluation.prompt_filter import PromptSafetyFilter, describe_summary

    prompt_filter = PromptSafetyFilter.from_config(node)
    if prompt_filter is None:
        return records, None
    try:
        records, summary = prompt_filter.filter_records(records)
    finally:
        prompt_filter.release()
    print(f"prompt filter: {describe_summary(summary)}")
    return records, summary


# ---------------------------------------------------------------------------------------------------- main
def guidance_masks(reward_guidance, model, backbone, batch: list, extras: dict, options: dict, out_dir: Path):
    """The reward-guidance masks (B, 1, H, W) of one batch ``[(prompt_index, record, seed)]``, or None (M = 1):
    read from the given mask image / folder, or made by the mask pipeline from the unguided images of the same seeds
    (``model.sample`` as without guidance) and written to ``out_dir/masks/`` (white = the guided region)."""
    from alignment.files import image_name, save_png
    from alignment.sampling.sample import to_pil

    prompts, seeds = [r["prompt"] for _, r, _ in batch], [s for _, _, s in batch]
    if reward_guidance.mask_path is not None:
        side = [n * backbone.vae_scale_factor for n in backbone.latent_shape[-2:]]
        return reward_guidance.masks_from_files([i for i, _, _ in batch], seeds, tuple(side))
    if not reward_guidance.needs_unguided:
        return None
    unguided = model.sample(prompts, seeds, extras, **options)
    masks = reward_guidance.masks_from_images(unguided, prompts)
    (out_dir / MASK_DIR).mkdir(parents=True, exist_ok=True)
    for (i, _, seed), mask in zip(batch, to_pil(masks.expand(-1, 3, -1, -1))):
        save_png(mask.convert("L"), out_dir / MASK_DIR / image_name(i, seed))
    return masks


def remove_stale_masks(mask_dir: Path, reward_guidance, written: set[str]) -> None:
    """Delete the masks in ``mask_dir`` (``out_dir/masks``) of an earlier guided run that this run did not make —
    never the masks this run was given: nothing is deleted when ``reward_guidance.mask`` is that folder, a folder
    holding it, or a file inside it (a rerun with ``reward_guidance.mask=<out_dir>/masks`` keeps its input)."""
    if not mask_dir.is_dir():
        return
    made = reward_guidance is not None and reward_guidance.needs_unguided
    given = None if reward_guidance is None else reward_guidance.mask_path
    if given is not None:
        folder, given = mask_dir.resolve(), given.resolve()
        if folder == given or given in folder.parents or folder in given.parents:
            return
    for stale in mask_dir.iterdir():
        if stale.is_file() and IMAGE_PATTERN.match(stale.name) and not (made and stale.name in written):
            stale.unlink()


def image_extras(records: list[dict], seeds: list[int], names, values: dict | None = None) -> dict:
    """``{(prompt_index, seed): {name: value}}``: the extras ``names`` of every image, from the rows' fields of the
    same name, with ``value`` replaced by ``values`` (the retriever's per-image values) when given."""
    out = {}
    for i, record in enumerate(records):
        for seed in seeds:
            extra = {name: record.get(name) for name in names}
            if values is not None and "value" in extra:
                extra["value"] = values[(i, seed)]
            out[(i, seed)] = extra
    return out


def image_values(settings: dict | None, records: list[dict], seeds: list[int], specs: dict) -> dict | None:
    """The value of every image ``(prompt_index, seed)`` from the retriever (``retriever_settings``), or None when
    it is off or no model's conditioner reads a ``value``."""
    from alignment.retrieval.values import ValueRetriever, describe_values

    if settings is None:
        return None
    if not any("value" in spec.conditioner_extras for spec in specs.values()):
        print("warning: retriever: no model's conditioner reads a value; the retriever is not used", file=sys.stderr)
        return None
    retriever = ValueRetriever(**settings)
    values = retriever.image_values([r["prompt"] for r in records], seeds, [r.get("value") for r in records])
    print(f"retriever ({settings['classifier']}): {describe_values(values)}")
    return values


def generate_model(backbone, spec, records: list[dict], seeds: list[int], out_dir: Path, settings: dict,
                   grid: bool, batch_size: int, extras: dict | None = None, retriever: dict | None = None,
                   safety=None, reward_guidance=None) -> dict:
    """Sample one model (``spec`` applied to the backbone) into ``out_dir``: images, ``grid.png``, ``index.jsonl``.

    ``extras`` (``image_extras``: ``{(prompt_index, seed): {name: value}}``, the same for every model of a run) are
    the images' extras; every model gets them, so its batches are split into images with and without one as every
    other model's are (``LoadedModel.sample``), and the conditioner reads those it knows. Default: the rows' fields
    named by this model's conditioner. ``retriever``: its settings, recorded with the images of a model that reads a
    ``value``. ``safety``: Safe Latent Diffusion (``alignment.sampling.sld.SafetyGuidance``; None: off), recorded as
    ``settings["sld"]``. ``reward_guidance``: ``alignment.sampling.reward_guidance.RewardGuidance`` (None: off), its
    settings recorded as ``settings["reward_guidance"]``; masks made from the unguided images go to ``masks/``."""
    import torch

    from alignment.runs import model_loaded
    from alignment.sampling.sample import image_grid, to_pil

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # a run that dies part-way leaves no index describing it
    jobs = [(i, record, seed) for i, record in enumerate(records) for seed in seeds]
    grid_images, rows = [], []
    base = {"adapter": str(spec.adapter) if spec.adapter is not None else None,
            "lora_scale": spec.lora_scale if spec.adapter is not None else None,
            "run": str(spec.run) if spec.run is not None else None, "lan": spec.lan, **settings}
    with model_loaded(backbone, spec) as model:
        extras_names = model.extras
        if extras is None:
            extras = image_extras(records, seeds, extras_names)
        if retriever is not None and "value" in extras_names:
            base["retriever"] = retriever
        names = list(dict.fromkeys(name for extra in extras.values() for name in extra))
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            batch_prompts, batch_seeds = [r["prompt"] for _, r, _ in batch], [s for _, _, s in batch]
            batch_extras = {name: [extras[(i, s)].get(name) for i, _, s in batch] for name in names}
            options = dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                           negative_prompt=settings["negative_prompt"], sampler=settings["sampler"])
            masks = None
            if reward_guidance is not None:
                masks = guidance_masks(reward_guidance, model, backbone, batch, batch_extras, options, out_dir)
                options.update(reward_guidance=reward_guidance, masks=masks)
            pixels = model.sample(batch_prompts, batch_seeds, batch_extras, **options,
                                  **({} if safety is None else {"safety": safety}))
            for b, ((i, record, seed), image) in enumerate(zip(batch, to_pil(pixels))):
                name = image_name(i, seed)
                save_png(image, out_dir / name)
                extra = {k: extras[(i, seed)].get(k) for k in extras_names}  # what the conditioner was given
                rows.append({"prompt_index": i, "prompt": record["prompt"], "seed": seed, "file": name, **base,
                             **({"extras": extra} if extra else {}),
                             **({"mask_fraction": float(masks[b].mean())} if masks is not None else {})})
                if grid and i < GRID_MAX_ROWS:
                    grid_images.append(image)
            if len(jobs) > batch_size:
                print(f"generate {spec.name}: {min(start + batch_size, len(jobs))}/{len(jobs)} images",
                      file=sys.stderr)
            if backbone.device.type == "cuda":
                torch.cuda.empty_cache()

    # Re-running into the same folder: drop images and the grid of an earlier run that this run did not write.
    written = {r["file"] for r in rows}
    for stale in out_dir.iterdir():
        if stale.is_file() and IMAGE_PATTERN.match(stale.name) and stale.name not in written:
            stale.unlink()
    remove_stale_masks(out_dir / MASK_DIR, reward_guidance, written)
    grid_path = out_dir / GRID_NAME
    if grid_images:
        save_png(image_grid(grid_images, columns=len(seeds)), grid_path)
    else:
        grid_path.unlink(missing_ok=True)
    atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), out_dir / INDEX_NAME)
    return {"out_dir": str(out_dir), "images": len(rows), "index": str(out_dir / INDEX_NAME),
            "grid": str(grid_path) if grid_images else None}


def generate(cfg: DictConfig) -> dict:
    from alignment.config import boolean, instantiate_checked, number, positive_int
    from alignment.retrieval.values import retriever_settings
    from alignment.runs import check_same_base, parse_models, resolve_path
    from alignment.sampling.sample import check_sampler
    from alignment.sampling.reward_guidance import RewardGuidance
    from alignment.sampling.sld import check_guidance, safety_from_config

    # Every cheap check before the model is built.
    retriever = retriever_settings(cfg.get("retriever"), "retriever")
    records = load_prompt_records(cfg.get("prompts"), cfg.get("prompt"))
    seeds = check_seeds(cfg.get("seeds"))
    # null: the run's recorded method.inference setting (HG-DPO: LoRA scale 0.5), else 1.0 / false
    lora_scale = None if cfg.get("lora_scale") is None else number(cfg.get("lora_scale"), "lora_scale")
    lan = None if cfg.get("lan") is None else boolean(cfg.get("lan"), "lan")
    models_node = cfg.get("models")
    if models_node:
        if cfg.get("adapter") not in (None, ""):
            raise ConfigError("adapter / models: give one model with adapter=<path> or several with "
                              "+models.<name>.run=<run folder>, not both")
        specs = parse_models(models_node, lan=lan)
    else:
        specs = {"default": resolve_path(cfg.get("adapter"), "default", "adapter", lora_scale, lan)}
    settings = {"sampler": check_sampler(cfg.get("sampler", "ddim"), "sampler"),
                "steps": positive_int(cfg.get("num_inference_steps"), "num_inference_steps"),
                "guidance": number(cfg.get("guidance_scale"), "guidance_scale")}
    safety = safety_from_config(cfg.get("sld"), "sld")
    check_guidance(safety, settings["guidance"], "sld")
    settings["sld"] = None if safety is None else safety.identity()
    if safety is not None:
        lan_models = [name for name, spec in specs.items() if spec.lan]
        if lan_models:
            raise ConfigError(f"sld: Safe Latent Diffusion is not combined with LAN (model {lan_models[0]!r} samples "
                              f"with lan=true); set lan=false or sld.preset=null")
    # Reward guidance (docs/methods.md#reward-guidance-baseline): its scorers are checked from their classes here.
    reward_guidance = RewardGuidance.from_config(cfg.get("reward_guidance"), cfg.get("scorers"),
                                                 cfg.backbone.get("resolution"))
    settings["reward_guidance"] = None if reward_guidance is None else reward_guidance.settings()
    if reward_guidance is not None:
        if safety is not None:
            raise ConfigError("reward_guidance: not combined with Safe Latent Diffusion (set sld.preset=null or "
                              "reward_guidance.scorer=null)")
        lan_models = [name for name, spec in specs.items() if spec.lan]
        if lan_models:
            raise ConfigError(f"reward_guidance: not combined with LAN (model {lan_models[0]!r} samples with "
                              f"lan=true); set lan=false or reward_guidance.scorer=null")
    batch_size = positive_int(cfg.get("batch_size"), "batch_size")
    negative_prompt = cfg.get("negative_prompt")
    settings["negative_prompt"] = "" if negative_prompt is None else str(negative_prompt)
    device = resolve_device(cfg.get("device"))
    if not cfg.get("out_dir"):
        raise ConfigError("out_dir: must be a folder path")
    out_dir = Path(str(cfg.out_dir)).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir: {out_dir} exists and is not a folder")
    records, filter_summary = filter_prompts(cfg.get("prompt_filter"), records)
    if reward_guidance is not None:
        reward_guidance.check_mask_files(len(records), seeds)
    # The extras of every image, the same for every model (the retriever, if on, runs once, before any model).
    values = image_values(retriever, records, seeds, specs)
    extras = image_extras(records, seeds, list(dict.fromkeys(n for spec in specs.values()
                                                             for n in spec.conditioner_extras)), values)
    if values is None:
        retriever = None

    out_dir.mkdir(parents=True, exist_ok=True)
    filter_file = out_dir / FILTER_NAME
    if filter_summary is None:
        filter_file.unlink(missing_ok=True)  # an earlier filtered run's record would describe other images
    else:
        atomic_write_text(json.dumps(filter_summary, indent=2, ensure_ascii=False) + "\n", filter_file)
    if reward_guidance is not None:  # its scorers' weights fail here, before the backbone loads
        reward_guidance.load(device)
    backbone = instantiate_checked(cfg.backbone, "backbone")
    backbone.to(device).eval()
    settings["backbone"] = backbone.name
    results = {}
    for name, spec in specs.items():
        if not spec.is_base:
            check_same_base(spec, cfg.backbone)
        folder = out_dir if not models_node else out_dir / name
        results[name] = generate_model(backbone, spec, records, seeds, folder, settings, bool(cfg.get("grid")),
                                       batch_size, extras, retriever, safety, reward_guidance)
        note = f" with {spec.weights}" + (f" (LoRA scale {spec.lora_scale:g})" if spec.adapter else "") \
            + (" with LAN against the base model" if spec.lan else "") if not spec.is_base else ""
        if safety is not None:
            note += f" with Safe Latent Diffusion ({safety.preset})"
        if reward_guidance is not None:
            note += f" with reward guidance ({reward_guidance.describe()})"
        grid = results[name]["grid"]
        grid_note = ""
        if grid:
            grid_note = f"; grid {grid}" + (f" (first {GRID_MAX_ROWS} prompts)" if len(records) > GRID_MAX_ROWS
                                            else "")
        print(f"done: {results[name]['images']} images ({len(records)} prompt(s) x {len(seeds)} seed(s)){note} in "
              f"{folder}; index {results[name]['index']}{grid_note}")
    return results["default"] if not models_node else {"models": results}


@entry_point("generate")
def main(cfg: DictConfig):
    return generate(cfg)


if __name__ == "__main__":
    main()
