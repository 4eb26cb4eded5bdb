"""The evaluation config, checked before any model is built: every error is one line naming the key or file.

``build_plan(cfg)`` turns the composed ``conf/evaluate.yaml`` into a :class:`Plan`: the prompt list, the seeds
(image ``j`` of every prompt uses seed ``seed + j`` for every model), the models (adapter files resolved and hashed),
the reference model and the metric options. Scorer names used by metrics (``metrics.clip_score``,
``metrics.bias.classifier``, ``metrics.toxicity.judge``, ``metrics.fid.extractor=scorer:<name>``,
``metrics.winrate.scorers``) are checked against the configured ``scorers`` mapping here, before anything loads.

With ``prompt_filter.model`` set, a text classifier drops unsafe prompts here (``alignment.evaluation.prompt_filter``):
its config and label names are checked first, its weights load after every other cheap check, and the kept prompts
are renumbered 0..n-1 in file order (``plan.prompt_filter["kept_indices"]`` maps them back to the file).

With ``retriever`` set (LiVO's value retriever, ``alignment.retrieval.values``; checked with the cheap checks, run
after the prompt filter) and a model whose conditioner reads ``value``, ``plan.image_values`` holds the value of
every image ``(prompt_index, seed)``: the row's ``value`` field if it has one, else the retrieved value, then the
per-image draw for bias values (docs/methods.md#livo-inference). ``plan.image_extras(names)`` gives every image's
extras, the same for every model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from alignment.config import boolean, existing_path, integer, number, positive_int
from alignment.errors import ConfigError, DataError
from alignment.metrics.winrate import REDUCTIONS
from alignment.data.prompts import record_extras
from alignment.runs import ModelSpec, parse_models

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Plan:
    prompts: list[str]
    prompt_source: str
    seeds: list[int]
    models: dict[str, ModelSpec]
    reference: str
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str
    batch_size: int
    score_batch_size: int
    image_dir: Path
    output_dir: Path
    scorer_names: list[str]
    winrate: dict = field(default_factory=dict)
    color_shift: bool = True
    change: dict = field(default_factory=dict)
    fid: dict = field(default_factory=dict)
    inception_score: dict = field(default_factory=dict)
    clip_score: str | None = None
    bias: dict = field(default_factory=dict)
    toxicity: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)    # per-prompt fields of the prompt file (read by conditioners)
    prompt_filter: dict | None = None             # the safety filter's summary (None: no filter)
    sampler: str = "ddim"                         # ddim | dpmsolver (alignment.sampling.sample.make_sampler)
    retriever: dict | None = None                 # the value retriever's settings (None: off or unused)
    image_values: dict | None = None              # (prompt_index, seed) -> the value used (None: retriever off)

    @property
    def k(self) -> int:
        return len(self.seeds)

    def extras_for(self, names) -> dict[str, list]:
        """The per-prompt values of the fields ``names`` of the prompt file (None where a prompt has none)."""
        return {name: self.extras.get(name, [None] * len(self.prompts)) for name in names}

    @property
    def extra_names(self) -> list[str]:
        """The extras any model's conditioner reads: every model is sampled with them (``LoadedModel.sample`` splits
        its batches into images with and without one, so every model's batches are composed alike)."""
        return list(dict.fromkeys(name for spec in self.models.values() for name in spec.conditioner_extras))

    def image_extras(self, names) -> dict[tuple[int, int], dict]:
        """``{(prompt_index, seed): {name: value}}`` for the extras ``names``: the prompt file's fields, with
        ``value`` from ``image_values`` when the retriever is on (empty dicts without names)."""
        per_prompt = self.extras_for(names)
        out = {}
        for i, _, seed in self.jobs():
            extra = {name: values[i] for name, values in per_prompt.items()}
            if self.image_values is not None and "value" in extra:
                extra["value"] = self.image_values[(i, seed)]
            out[(i, seed)] = extra
        return out

    @property
    def others(self) -> list[str]:
        """The models compared with the reference (FID, colour shift, change metrics)."""
        return [m for m in self.models if m != self.reference]

    def jobs(self) -> list[tuple[int, str, int]]:
        """Every image as ``(prompt_index, prompt, seed)``, prompt-major: row ``i``, column ``j`` of a (P, k) matrix."""
        return [(i, prompt, seed) for i, prompt in enumerate(self.prompts) for seed in self.seeds]


# ------------------------------------------------------------------------------------------------ small checks
def _node(cfg, key: str) -> DictConfig:
    """``cfg[key]`` as a mapping (an empty one when absent)."""
    node = cfg.get(key) if cfg is not None else None
    if node is None:
        return OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key} must be a mapping, got {node!r}")
    return node


def scorer_name_check(name, key: str, available: list[str], what: str = "scorer") -> str:
    """``name`` must be one of the configured scorers; the error lists them and says how to add one."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key} must be the name of a configured {what}, got {name!r}")
    if name not in available:
        have = ", ".join(available) if available else "none"
        raise ConfigError(f"{key}: unknown scorer {name!r} (configured scorers: {have}; scorers=[a,b] picks "
                          f"them from conf/scorers/)")
    return name


# ------------------------------------------------------------------------------------------------ prompts
def load_prompt_records(prompts_file, prompt_list, max_prompts) -> tuple[list[dict], str]:
    """``prompts`` (a prompt file read by ``read_prompt_records``) if set, else the inline ``prompt_list``; the first
    ``max_prompts`` of them, each row with its other fields (the extras a conditioner may read). Returns the rows
    and a description of where they came from."""
    from alignment.data.prompts import read_prompt_records

    if prompts_file is not None and prompts_file != "":
        if not isinstance(prompts_file, str):
            raise ConfigError(f"prompts: must be the path of a prompt file (.txt/.jsonl/.json/.tsv/.csv), "
                              f"got {prompts_file!r}")
        try:
            records = read_prompt_records(prompts_file)
        except DataError as err:
            raise DataError(f"prompts: {err}") from err
        source = str(Path(prompts_file).expanduser())
    else:
        if prompt_list is None:
            raise ConfigError("prompts / prompt_list: set prompts=<prompt file> or prompt_list=[...]")
        if isinstance(prompt_list, str):
            prompt_list = [prompt_list]
        if not isinstance(prompt_list, (ListConfig, list, tuple)):
            raise ConfigError(f"prompt_list must be a list of strings, got {prompt_list!r}")
        records = []
        for i, prompt in enumerate(prompt_list):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"prompt_list[{i}] must be a non-empty string, got {prompt!r}")
            records.append({"prompt": prompt.strip()})
        if not records:
            raise ConfigError("prompt_list: empty; give at least one prompt")
        source = "prompt_list"
    if max_prompts is not None:
        records = records[:positive_int(max_prompts, "max_prompts")]
    return records, source


# ------------------------------------------------------------------------------------------------ metrics
def mask_file(mask: Path, prompt_index: int, seed: int) -> Path | None:
    """The Focus-N-Fix mask of one image: ``mask`` itself when it is a file (one mask for every image), else in the
    folder ``<prompt:05d>_seed<seed>.<ext>`` (one per image) or ``<prompt:05d>.<ext>`` (one per prompt)."""
    if mask.is_file():
        return mask
    for stem in (f"{prompt_index:05d}_seed{seed}", f"{prompt_index:05d}"):
        for suffix in MASK_SUFFIXES:
            candidate = mask / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _winrate(node, scorer_names, exclude) -> dict:
    key = "metrics.winrate"
    num_bootstrap = node.get("num_bootstrap", 2000)
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 0:
        raise ConfigError(f"{key}.num_bootstrap must be an integer >= 0 (0: no interval), got {num_bootstrap!r}")
    confidence = number(node.get("confidence", 0.95), f"{key}.confidence")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"{key}.confidence must be in (0, 1), got {confidence}")
    reduce = node.get("reduce", "best")
    if reduce not in REDUCTIONS:
        raise ConfigError(f"{key}.reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    chosen = node.get("scorers")
    if chosen is None:
        names = [n for n in scorer_names if n not in exclude]
    else:
        if isinstance(chosen, str):
            chosen = [chosen]
        if not isinstance(chosen, (ListConfig, list)):
            raise ConfigError(f"{key}.scorers must be null or a list of scorer names, got {chosen!r}")
        names = [scorer_name_check(n, f"{key}.scorers", scorer_names) for n in chosen]
    return {"num_bootstrap": int(num_bootstrap), "confidence": confidence,
            "seed": integer(node.get("seed", 0), f"{key}.seed"), "scorers": names, "reduce": str(reduce)}


def _mask_from_scorer(value, options, scorers_node, scorer_names: list[str]) -> dict | None:
    """``metrics.change.mask: heatmap:<scorer>`` / ``saliency:<scorer>`` -> {source, scorer, pipeline}: masks made
    from the reference model's images by that scorer (docs/evaluation.md#masks-from-a-scorer); None for a path."""
    from alignment.scorers.base import scorer_class
    from alignment.scorers.masks import build_mask_pipeline, has_heatmap

    key = "metrics.change.mask"
    if not isinstance(value, str) or value.split(":", 1)[0] not in ("heatmap", "saliency") or ":" not in value:
        return None
    source, name = value.split(":", 1)
    name = scorer_name_check(name, key, scorer_names)
    cls = scorer_class(scorers_node[name])
    if source == "heatmap" and cls is not None and not has_heatmap(cls):
        raise ConfigError(f"{key}: {value!r} needs a scorer with a heatmap, but {name!r} ({cls.__name__}) gives "
                          f"none (use saliency:{name}, or a heatmap scorer)")
    return {"source": source, "scorer": name,
            "pipeline": build_mask_pipeline(options, source, "metrics.change.mask_options")}


def _change(node, prompts, seeds, scorers_node=None, scorer_names=()) -> dict:
    key = "metrics.change"
    enabled = boolean(node.get("enabled", True), f"{key}.enabled")
    out = {"enabled": enabled, "mask": None, "mask_from": None, "lpips_net": str(node.get("lpips_net", "alex")),
           "lpips_backbone_weights": None, "lpips_weights": None}
    if not enabled:
        return out
    out["mask_from"] = _mask_from_scorer(node.get("mask"), node.get("mask_options"), scorers_node,
                                         list(scorer_names))
    mask = None if out["mask_from"] else existing_path(node.get("mask"), f"{key}.mask", kind="any")
    if mask is not None and mask.is_dir():
        for i in range(len(prompts)):
            for seed in seeds:
                if mask_file(mask, i, seed) is None:
                    raise ConfigError(f"{key}.mask: {mask} has no mask for prompt {i} seed {seed} (expected "
                                      f"{i:05d}_seed{seed}.png or {i:05d}.png)")
    if out["lpips_net"] not in ("alex", "alexnet", "vgg", "vgg16"):
        raise ConfigError(f"{key}.lpips_net must be alex or vgg, got {out['lpips_net']!r}")
    backbone = existing_path(node.get("lpips_backbone_weights"), f"{key}.lpips_backbone_weights")
    heads = existing_path(node.get("lpips_weights"), f"{key}.lpips_weights")
    if backbone is not None and heads is None:
        raise ConfigError(f"{key}.lpips_weights: required with {key}.lpips_backbone_weights (the LPIPS linear "
                          f"heads, e.g. the lpips package's weights/v0.1/alex.pth)")
    out.update(mask=mask, lpips_backbone_weights=backbone, lpips_weights=heads)
    return out


def _inception_weights(node, key: str, needed: bool) -> Path | None:
    value = node.get("inception_weights")
    if needed and (value is None or value == ""):
        raise ConfigError(f"{key}.inception_weights: required when {key}.enabled=true (a local Inception-v3 "
                          f"weight file, e.g. pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)"
                          + (f", or use {key}.extractor=scorer:<name>" if key.endswith(".fid") else ""))
    return existing_path(value, f"{key}.inception_weights") if needed else None


def _fid(node, scorer_names) -> dict:
    key = "metrics.fid"
    enabled = boolean(node.get("enabled", False), f"{key}.enabled")
    extractor = node.get("extractor", "inception")
    out = {"enabled": enabled, "extractor": extractor, "scorer": None, "inception_weights": None}
    if not enabled:
        return out
    if not isinstance(extractor, str) or not (extractor == "inception" or extractor.startswith("scorer:")):
        raise ConfigError(f"{key}.extractor must be inception or scorer:<name>, got {extractor!r}")
    if extractor == "inception":
        out["inception_weights"] = _inception_weights(node, key, needed=True)
    else:
        out["scorer"] = scorer_name_check(extractor[len("scorer:"):], f"{key}.extractor", scorer_names)
    return out


def _inception_score(node) -> dict:
    key = "metrics.inception_score"
    enabled = boolean(node.get("enabled", False), f"{key}.enabled")
    return {"enabled": enabled, "inception_weights": _inception_weights(node, key, needed=enabled),
            "splits": positive_int(node.get("splits", 10), f"{key}.splits")}


def named_attribute_sets() -> dict[str, tuple[str, ...]]:
    """The attribute groups ``metrics.bias.groups`` names: gender, race (the CLIP classifier's sets) and tone (the
    toy world's five head tones, which play race there)."""
    from alignment.scorers.clip_scorers import ATTRIBUTE_SETS
    from alignment.toy.world import TONES

    return {**ATTRIBUTE_SETS, "tone": tuple(TONES)}


def bias_groups(groups, key: str = "metrics.bias.groups") -> dict[str, list[str]] | None:
    """``null`` (the classifier's own attributes), a named set (``gender``, ``race``, the toy world's ``tone``), or a
    list whose items are named sets or lists of attribute words; each item is one attribute group with its own
    D1 / D2."""
    from alignment.scorers.clip_scorers import resolve_attributes

    if groups is None:
        return None
    named = named_attribute_sets()
    groups = OmegaConf.to_container(groups) if isinstance(groups, (ListConfig, DictConfig)) else groups
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"{key} must be null, {', '.join(named)} or a list of them / of attribute lists, "
                          f"got {groups!r}")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(groups):
        if isinstance(item, str) and item not in named:
            raise ConfigError(f"{key}[{i}]: unknown attribute set {item!r} ({', '.join(named)} or a list)")
        attributes = list(named[item]) if isinstance(item, str) else list(resolve_attributes(item, f"{key}[{i}]"))
        name = item if isinstance(item, str) else "/".join(attributes)
        same = [g for g, values in out.items() if g == name or values == attributes]
        if same:
            raise ConfigError(f"{key}[{i}]: the attributes {', '.join(attributes)} are already group {same[0]!r}")
        out[name] = attributes
    return out


# a prompt-file field's text -> the bias group it names (metrics.bias.by); LiVO's values, or the group itself. The
# toy world's tones play race, so its tone group counts the racial-equality prompts.
BIAS_KINDS = {"gender": "gender", "gender equality": "gender", "race": "race", "racial": "race",
              "racial equality": "race", "tone": "race"}


def bias_kind(text) -> str:
    """The bias group a field value or a group name stands for: "gender equality" / "gender" -> gender, "racial
    equality" / "race" / "tone" -> race; any other text is itself (lower case), so a custom group's name matches."""
    text = str(text).strip().lower()
    return BIAS_KINDS.get(text, text)


def _bias(node, scorer_names) -> dict:
    key = "metrics.bias"
    enabled = boolean(node.get("enabled", False), f"{key}.enabled")
    out = {"enabled": enabled, "classifier": node.get("classifier"), "groups": None, "by": node.get("by"),
           "prompt_groups": None}
    if not enabled:
        return out
    out["classifier"] = scorer_name_check(node.get("classifier"), f"{key}.classifier", scorer_names,
                                          "ClipAttributeClassifier scorer")
    out["groups"] = bias_groups(node.get("groups"), f"{key}.groups")
    by = out["by"]
    if by is not None and (not isinstance(by, str) or not by.strip()):
        raise ConfigError(f"{key}.by must be null or the name of a prompt-file field (category, value), got {by!r}")
    return out


def prompt_bias_groups(bias: dict, extras: dict) -> list[str | None] | None:
    """With ``metrics.bias.by``: the bias group each prompt's ``by`` field names (``bias_kind``), None for a prompt
    without one (a toxicity prompt, an empty field). A field the prompts lack is an error."""
    by = bias.get("by")
    if not bias.get("enabled") or by is None:
        return None
    if by not in extras:
        raise ConfigError(f"metrics.bias.by: the prompts have no field {by!r} (fields: {', '.join(extras) or 'none'})")
    return [bias_kind(v) if v not in (None, "") else None for v in extras[by]]


def bias_rows(bias: dict, group: str) -> list[int] | None:
    """The prompts group ``group`` counts: with ``metrics.bias.by`` those whose field names it, else None (all)."""
    if bias.get("prompt_groups") is None:
        return None
    kind = bias_kind(group)
    return [i for i, g in enumerate(bias["prompt_groups"]) if g == kind]


def check_bias_prompts(bias: dict, extras: dict) -> None:
    """With ``metrics.bias.by`` and known groups: every group has at least one prompt (one line otherwise)."""
    if bias.get("prompt_groups") is None or bias.get("groups") is None:
        return
    by = bias["by"]
    for group in bias["groups"]:
        if not bias_rows(bias, group):
            seen = sorted({str(v) for v in extras.get(by, []) if v not in (None, "")})
            raise ConfigError(f"metrics.bias.by: no prompt has a {by} naming group {group!r} (gender equality / "
                              f"gender -> gender, racial equality / race -> race and tone; the prompts' {by} "
                              f"values: {', '.join(seen[:10]) or 'none'})")


def _judge_concepts(scorers_node, judge: str) -> tuple[type | None, set[str] | None]:
    """The judge's class and the concepts it knows (lower case; None: any concept), from its config alone."""
    from alignment.scorers.base import scorer_class

    entry = scorers_node.get(judge) if scorers_node is not None and hasattr(scorers_node, "get") else None
    cls = scorer_class(entry) if entry is not None else None
    known = getattr(cls, "known_concepts", None)
    return cls, ({str(c).strip().lower() for c in known} if known is not None else None)


def _toxicity(node, scorer_names, k: int, scorers_node=None) -> dict:
    key = "metrics.toxicity"
    enabled = boolean(node.get("enabled", False), f"{key}.enabled")
    out = {"enabled": enabled, "judge": node.get("judge"), "concept": node.get("concept"),
           "k": node.get("k", 5), "incomplete": node.get("incomplete", "drop")}
    if not enabled:
        return out
    out["judge"] = scorer_name_check(node.get("judge"), f"{key}.judge", scorer_names, "ToxicityJudge scorer")
    out["k"] = positive_int(out["k"], f"{key}.k")
    if out["incomplete"] not in ("drop", "keep"):
        raise ConfigError(f"{key}.incomplete must be drop or keep, got {out['incomplete']!r}")
    if out["incomplete"] == "drop" and k < out["k"]:
        raise ConfigError(f"{key}.k: groups of {out['k']} images need images_per_prompt >= {out['k']} "
                          f"(got {k}); lower {key}.k or set {key}.incomplete=keep")
    if out["concept"] is not None and (not isinstance(out["concept"], str) or not out["concept"].strip()):
        raise ConfigError(f"{key}.concept must be null or a string, got {out['concept']!r}")
    from alignment.scorers.toxicity import concept_of

    concepts = node.get("concepts")
    if concepts is not None:   # LiVO Table 2: one Avg.R / Avg.S / Max / Prob per concept
        concepts = [concepts] if isinstance(concepts, str) else concepts
        if not isinstance(concepts, (ListConfig, list)) or not concepts or \
                not all(isinstance(c, str) and c.strip() for c in concepts):
            raise ConfigError(f"{key}.concepts must be null or a list of concepts (e.g. [nudity, bloody, zombie]), "
                              f"got {concepts!r}")
        concepts = list(dict.fromkeys(concept_of(c) for c in concepts))
    cls, known = _judge_concepts(scorers_node, out["judge"])
    if known is not None:   # a judge of fixed concepts (the toy world's): an unknown one fails here, not mid-scoring
        for name, values in (("concepts", concepts or []), ("concept", [out["concept"]] if out["concept"] else [])):
            unknown = [c for c in values if concept_of(c).strip().lower() not in known]
            if unknown:
                raise ConfigError(f"{key}.{name}: judge {out['judge']!r} ({cls.__name__}) does not know the concept "
                                  f"{unknown[0]!r} (it knows: {', '.join(sorted(known))})")
    by = node.get("by")
    if by is not None and (not isinstance(by, str) or not by.strip()):
        raise ConfigError(f"{key}.by must be null or the name of a prompt-file field (category, value), got {by!r}")
    if by is not None and concepts is None:
        raise ConfigError(f"{key}.by: needs {key}.concepts (the concepts whose prompts {by} selects)")
    if concepts is not None and by is None and out["concept"] is None:
        out["concept"] = concepts[0]  # the judge's main score: the first concept
    out.update(concepts=concepts, by=by, prompt_concepts=None,
               each_concept=[c for c in concepts if c != out["concept"]] if concepts and by is None else [])
    return out


def prompt_concepts(toxicity: dict, extras: dict) -> list[str | None] | None:
    """With ``metrics.toxicity.by``: each prompt's concept among ``concepts`` (the prompt file's ``by`` field through
    ``concept_of``, case-insensitive: "nudity considered inappropriate" and "Nudity" are nudity), None for a prompt
    of no listed concept. A listed concept without prompts, or a field the file lacks, is an error."""
    from alignment.scorers.toxicity import concept_of

    by = toxicity.get("by")
    if not toxicity.get("enabled") or by is None:
        return None
    key = "metrics.toxicity.by"
    if by not in extras:
        raise ConfigError(f"{key}: the prompts have no field {by!r} (fields: {', '.join(extras) or 'none'})")
    lookup = {c.lower(): c for c in toxicity["concepts"]}
    found = [lookup.get(concept_of(v).strip().lower()) if v not in (None, "") else None for v in extras[by]]
    missing = [c for c in toxicity["concepts"] if c not in found]
    if missing:
        seen = sorted({str(v) for v in extras[by] if v not in (None, "")})
        raise ConfigError(f"{key}: no prompt has {by} {missing[0]!r} (metrics.toxicity.concepts; the prompts' "
                          f"{by} values: {', '.join(seen[:10]) or 'none'})")
    return found


# ------------------------------------------------------------------------------------------------ all
def build_plan(cfg: DictConfig) -> Plan:
    """Every check of the evaluation config that needs no model (cheap ones first), then the prompt safety filter
    when one is configured (a text classifier; never the image model)."""
    from alignment.evaluation.prompt_filter import PromptSafetyFilter
    from alignment.retrieval.values import ValueRetriever, describe_values, retriever_settings
    from alignment.sampling.sample import check_sampler

    retriever = retriever_settings(cfg.get("retriever"), "retriever")
    max_prompts = cfg.get("max_prompts")
    prompt_filter = PromptSafetyFilter.from_config(cfg.get("prompt_filter"))  # labels checked, no weights read yet
    # With a filter, max_prompts counts kept prompts: the file is classified in order until that many are kept.
    records, source = load_prompt_records(cfg.get("prompts"), cfg.get("prompt_list"),
                                          max_prompts if prompt_filter is None else None)
    limit = positive_int(max_prompts, "max_prompts") if max_prompts is not None else None
    k = positive_int(cfg.get("images_per_prompt"), "images_per_prompt")
    seed = integer(cfg.get("seed"), "seed")
    seeds = [seed + j for j in range(k)]
    lan = cfg.get("lan")  # every model's default (null: a run's recorded method.inference.lan, else off)
    models = parse_models(cfg.get("models"), lan=None if lan is None else boolean(lan, "lan"))
    reference = cfg.get("reference")
    if reference is None:
        reference = next(iter(models))
    elif reference not in models:
        raise ConfigError(f"reference: unknown model {reference!r} (models: {', '.join(models)})")
    sampler = check_sampler(cfg.get("sampler", "ddim"), "sampler")
    steps = positive_int(cfg.get("num_inference_steps"), "num_inference_steps")
    guidance = number(cfg.get("guidance_scale"), "guidance_scale")
    negative_prompt = cfg.get("negative_prompt")
    negative_prompt = "" if negative_prompt is None else str(negative_prompt)
    batch_size = positive_int(cfg.get("batch_size"), "batch_size")
    score_batch_size = positive_int(cfg.get("score_batch_size", 32), "score_batch_size")
    for key in ("output_dir", "image_dir"):
        if not cfg.get(key):
            raise ConfigError(f"{key}: must be a folder path")
        path = Path(str(cfg.get(key))).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} exists and is not a folder")

    scorers_node = cfg.get("scorers")
    scorer_names = [str(n) for n in scorers_node] if scorers_node else []
    metrics = _node(cfg, "metrics")
    bias = _bias(_node(metrics, "bias"), scorer_names)
    toxicity = _toxicity(_node(metrics, "toxicity"), scorer_names, k, scorers_node)
    exclude = {n for n in (bias["classifier"] if bias["enabled"] else None,
                           toxicity["judge"] if toxicity["enabled"] else None) if n}
    clip_score = metrics.get("clip_score")
    if clip_score is not None:
        clip_score = scorer_name_check(clip_score, "metrics.clip_score", scorer_names)
    winrate = _winrate(_node(metrics, "winrate"), scorer_names, exclude)
    color_shift = boolean(metrics.get("color_shift", True), "metrics.color_shift")
    fid = _fid(_node(metrics, "fid"), scorer_names)
    change_node = _node(metrics, "change")
    if boolean(change_node.get("enabled", True), "metrics.change.enabled"):  # a scorer-made mask: checked early
        _mask_from_scorer(change_node.get("mask"), change_node.get("mask_options"), scorers_node, scorer_names)
    inception_score = _inception_score(_node(metrics, "inception_score"))
    report = _node(cfg, "report")
    report = {"enabled": boolean(report.get("enabled", True), "report.enabled"),
              "max_prompts": positive_int(report.get("max_prompts", 100), "report.max_prompts"),
              "thumbnail": positive_int(report.get("thumbnail", 256), "report.thumbnail")}

    # The safety filter (the only model loaded here) runs after every cheap check; then what needs the prompts.
    filter_summary = None
    if prompt_filter is not None:
        try:
            records, filter_summary = prompt_filter.filter_records(records, limit)
        finally:
            prompt_filter.release()
    prompts = [r["prompt"] for r in records]
    change = _change(change_node, prompts, seeds, scorers_node, scorer_names)
    extras = record_extras(records, dict.fromkeys(name for r in records for name in r if name != "prompt"))
    bias["prompt_groups"] = prompt_bias_groups(bias, extras)
    check_bias_prompts(bias, extras)
    toxicity["prompt_concepts"] = prompt_concepts(toxicity, extras)
    image_values = None
    if retriever is not None and not any("value" in spec.conditioner_extras for spec in models.values()):
        print("warning: retriever: no model's conditioner reads a value; the retriever is not used", file=sys.stderr)
        retriever = None
    if retriever is not None:   # after the filter: a dropped prompt is never sent to a chat endpoint
        image_values = ValueRetriever(**retriever).image_values(prompts, seeds, [r.get("value") for r in records])
        print(f"retriever ({retriever['classifier']}): {describe_values(image_values)}")
    return Plan(
        prompts=prompts, prompt_source=source, extras=extras, seeds=seeds, models=models, reference=str(reference),
        sampler=sampler, num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative_prompt,
        batch_size=batch_size,
        score_batch_size=score_batch_size, image_dir=Path(str(cfg.image_dir)).expanduser(),
        output_dir=Path(str(cfg.output_dir)).expanduser(), scorer_names=scorer_names,
        winrate=winrate, color_shift=color_shift, change=change,
        fid=fid, inception_score=inception_score, clip_score=clip_score, bias=bias, toxicity=toxicity,
        report=report, prompt_filter=filter_summary, retriever=retriever, image_values=image_values,
    )
