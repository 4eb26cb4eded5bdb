"""Scores and metrics over the cached images: one streaming pass per model, then the tables (docs/evaluation.md).

Every model's images are read back from their PNG files (so a cached and a freshly generated image are scored
alike), ``score_batch_size`` at a time; nothing holds all images in memory. In one pass per model:

- every scorer gives one score per image -> a ``(P, k)`` matrix per scorer and model (row = prompt, column = seed);
- colour shift (HG-DPO, docs/evaluation.md#colour-shift): the mean H, S, V over all pixels of each model
(``hsv_means``), and
  ``100·|mean_model − mean_reference| / mean_reference`` per channel for every other model;
- change metrics (Focus-N-Fix, docs/evaluation.md#change-metrics): PSNR, SSIM (and LPIPS when its weight files are
given) between the
  reference's and the model's image of the same prompt and seed, overall and inside / outside the mask; the mean
  over images (images whose region is empty are skipped). The reference is not compared with itself (its PSNR would
  be +inf): the table holds the other models only;
- FID (against the reference model's images; the reference itself is left out, its FID would be 0) and Inception
  Score from one Inception-v3 (local weight file) or, for FID, a scorer's L2-normalised CLIP image embedding
  (``scorer:<name>``: an FID-like distance in that feature space, not comparable with published FIDs);
- LiVO bias (D1, D2 over the attribute classifier's argmax per image, per prompt; with ``metrics.bias.by`` each
  group over the prompts whose field names it) and toxicity (Avg.R, Avg.S, Max, Prob from the judge's P(yes), groups
  of ``k`` images in seed order).

Win rates (docs/evaluation.md#win-rate): best-of-k per prompt, ties half, percentile bootstrap over prompts, every
ordered model pair and
every win-rate scorer (``win_rate_table``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignment.errors import ConfigError, DataError
from alignment.evaluation.plan import Plan, mask_file


@dataclass
class Evaluation:
    """Per-image results (kept for the report / W&B table) and the summary ``metrics`` dict."""

    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> scorer -> (P, k)
    attribute_probs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> group -> (P,k,A)
    metrics: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ images
def read_images(paths: list[Path]) -> torch.Tensor:
    """PNG files -> (B, 3, H, W) float in [0, 1]."""
    from PIL import Image

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        except OSError as err:
            raise DataError(f"cannot read cached image {path} ({err}); delete it to regenerate it") from None
    if any(a.shape != arrays[0].shape for a in arrays):
        raise DataError(f"cached images of different sizes in {paths[0].parent} (delete the folder to regenerate)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def write_problem_masks(plan: Plan, reference_folder: Path, scorers: dict) -> Path:
    """``metrics.change.mask: heatmap:<scorer>`` / ``saliency:<scorer>``: one binary mask per image of the reference
    model, made by that scorer through the mask pipeline (``alignment.scorers.masks.problem_masks``), written as
    ``<output_dir>/masks/<prompt:05d>_seed<seed>.png`` (white = the problem region) and a tinted ``overlay_*.png``
    beside each; returns the folder (docs/evaluation.md#masks-from-a-scorer)."""
    from alignment.files import image_name, save_png
    from alignment.sampling.sample import to_pil
    from alignment.scorers.masks import mask_overlay, problem_masks

    spec = plan.change["mask_from"]
    scorer = scorers[spec["scorer"]]
    folder = plan.output_dir / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, p, s) for i, p in enumerate(plan.prompts) for s in plan.seeds]
    fractions = []
    for start in range(0, len(jobs), plan.score_batch_size):
        batch = jobs[start:start + plan.score_batch_size]
        images = read_images([reference_folder / image_name(i, s) for i, _, s in batch])
        masks = problem_masks(scorer, images.to(scorer.device, scorer.dtype), [p for _, p, _ in batch],
                              spec["source"], spec["pipeline"]).float().cpu()
        fractions += masks.flatten(1).mean(1).tolist()
        overlays = to_pil(mask_overlay(images, masks))
        for (i, _, s), mask, overlay in zip(batch, to_pil(masks.expand(-1, 3, -1, -1)), overlays):
            save_png(mask.convert("L"), folder / image_name(i, s))
            save_png(overlay, folder / f"overlay_{image_name(i, s)}")
    print(f"masks ({spec['source']}:{spec['scorer']}, from the {plan.reference} images): {len(jobs)} in {folder}, "
          f"mean area {100 * sum(fractions) / max(1, len(fractions)):.1f} %")
    return folder


def read_mask(path: Path, size: tuple[int, int], key: str = "metrics.change.mask") -> torch.Tensor:
    """A mask image -> (H, W) weights in [0, 1] at the image size (grey levels; resized bilinearly if needed);
    an unreadable file is a one-line ConfigError naming ``key`` (also read by generate's ``reward_guidance.mask``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
            if grey.size != (size[1], size[0]):
                grey = grey.resize((size[1], size[0]), Image.BILINEAR)
            return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path} ({err})") from None


# ------------------------------------------------------------------------------------------------ extractors
class ScorerFeatures:
    """A CLIP-backed scorer's L2-normalised image embedding as an FID feature extractor: (B,3,H,W) -> (B, D)."""

    def __init__(self, scorer, key: str):
        if not hasattr(scorer, "image_embeds"):
            raise ConfigError(f"{key}: scorer {scorer.name!r} ({type(scorer).__name__}) has no CLIP image tower "
                              f"to take features from (use a CLIP-backed scorer: clip, pickscore, hpsv2, ...)")
        self.scorer = scorer

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer.image_embeds(images.to(self.scorer.device)).float().cpu()


def takes_concepts(scorer) -> bool:
    """A toxicity judge: its ``forward`` takes per-image ``concepts`` (ToxicityJudge, the toy world's judge)."""
    import inspect

    try:
        return "concepts" in inspect.signature(scorer.forward).parameters
    except (TypeError, ValueError):
        return False


def load_metric_models(plan: Plan, scorers: dict, device) -> dict:
    """The networks the metrics need besides the scorers: Inception-v3 (shared by FID and IS when they name the same
    file), the FID extractor, LPIPS. Loading errors are one line naming the key."""
    from alignment.metrics.change import LPIPS
    from alignment.metrics.inception import InceptionV3

    models: dict = {"inception": {}, "fid_extractor": None, "lpips": None}

    def inception(path: Path, key: str):
        if path not in models["inception"]:
            models["inception"][path] = InceptionV3.from_file(path, key=key).to(device)
        return models["inception"][path]

    if plan.fid["enabled"]:
        if plan.fid["scorer"] is not None:
            models["fid_extractor"] = ScorerFeatures(scorers[plan.fid["scorer"]], "metrics.fid.extractor")
        else:
            models["fid_extractor"] = inception(plan.fid["inception_weights"], "metrics.fid.inception_weights")
    if plan.inception_score["enabled"]:
        models["is_classifier"] = inception(plan.inception_score["inception_weights"],
                                            "metrics.inception_score.inception_weights")
    change = plan.change
    if change["enabled"] and change["lpips_weights"] is not None:
        models["lpips"] = LPIPS.from_files(change["lpips_backbone_weights"], change["lpips_weights"],
                                           net=change["lpips_net"]).to(device)
    if plan.bias["enabled"]:
        classifier = scorers[plan.bias["classifier"]]
        if not hasattr(classifier, "classify"):
            raise ConfigError(f"metrics.bias.classifier: scorer {plan.bias['classifier']!r} is not an attribute "
                              f"classifier (a ClipAttributeClassifier, e.g. scorers=[attributes])")
        if plan.bias["groups"] is None:  # the classifier's own attribute set
            from alignment.evaluation.plan import bias_groups, check_bias_prompts, named_attribute_sets

            own = list(classifier.attributes)
            named = [name for name, values in named_attribute_sets().items() if list(values) == own]
            plan.bias["groups"] = bias_groups(named[:1] or [own])
            check_bias_prompts(plan.bias, plan.extras)
    if plan.toxicity["enabled"]:
        judge = scorers[plan.toxicity["judge"]]
        if not takes_concepts(judge):
            raise ConfigError(f"metrics.toxicity.judge: scorer {plan.toxicity['judge']!r} is not a toxicity judge "
                              f"(a ToxicityJudge, e.g. scorers=[toxicity_judge])")
        if plan.toxicity.get("prompt_concepts") is None and plan.toxicity["concept"] is None and judge.concept is None:
            raise ConfigError(f"metrics.toxicity.concept: required (scorer {plan.toxicity['judge']!r} has no fixed "
                              f"concept), e.g. metrics.toxicity.concept=nudity")
    return models


# ------------------------------------------------------------------------------------------------ the pass
def _features(extractor, images: torch.Tensor, field_name: str = "features") -> torch.Tensor:
    from alignment.metrics.fid import extract_features

    return extract_features(images, extractor, batch_size=images.shape[0], field=field_name)


def _inception_outputs(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(images.to(device))
    return out.features.double().cpu(), out.logits.double().cpu()


def _score_batch(name: str, scorer, images, prompts, plan: Plan, batch_size: int,
                 indices: list[int] | None = None) -> torch.Tensor:
    tox = plan.toxicity
    if tox["enabled"] and name == tox["judge"]:
        # each image judged for its prompt's concept (metrics.toxicity.by; a prompt of no listed concept, counted
        # in no toxicity metric, for metrics.toxicity.concept or the first concept), else metrics.toxicity.concept,
        # else the judge's own
        per_prompt = tox.get("prompt_concepts")
        concepts = None
        if per_prompt is not None and indices is not None:
            concepts = [per_prompt[i] or tox["concept"] or tox["concepts"][0] for i in indices]
        elif tox["concept"] is not None:
            concepts = [tox["concept"]] * len(prompts)
        return scorer.score(images, prompts, batch_size=batch_size, concepts=concepts)
    return scorer.score(images, prompts, batch_size=batch_size)


def model_pass(plan: Plan, model: str, folders: dict[str, Path], scorers: dict, metric_models: dict) -> dict:
    """Everything that needs the pixels of one model (and, for change metrics, the reference's)."""
    from alignment.metrics.change import change_metrics
    from alignment.metrics.color import hsv_means, rgb_to_hsv

    from alignment.files import image_name

    jobs = plan.jobs()
    bs = plan.score_batch_size
    is_reference = model == plan.reference
    out: dict = {"scores": defaultdict(list), "probs": defaultdict(list),
                 "hsv_sum": torch.zeros(3, dtype=torch.float64),
                 "pixels": 0, "hsv_per_image": [], "change": defaultdict(list), "is_logits": [], "fid_features": []}
    lpips = metric_models["lpips"]
    change_device = next(lpips.parameters()).device if lpips is not None else torch.device("cpu")
    for start in range(0, len(jobs), bs):
        batch = jobs[start:start + bs]
        prompts = [p for _, p, _ in batch]
        images = read_images([folders[model] / image_name(i, s) for i, _, s in batch])
        for name, scorer in scorers.items():
            out["scores"][name].append(_score_batch(name, scorer, images, prompts, plan, bs,
                                                    [i for i, _, _ in batch]))
        for concept in (plan.toxicity.get("each_concept") or []) if plan.toxicity["enabled"] else []:
            judge = plan.toxicity["judge"]  # every image judged for every concept: one more (P, k) per concept
            out["scores"][f"{judge}:{concept}"].append(scorers[judge].score(images, prompts, batch_size=bs,
                                                                            concepts=[concept] * len(prompts)))
        if plan.bias["enabled"]:
            classifier = scorers[plan.bias["classifier"]]
            for group, attributes in plan.bias["groups"].items():
                with torch.no_grad():
                    probs = classifier.classify(images, prompts, attributes)
                out["probs"][group].append(probs.float().cpu())
        if plan.color_shift:
            n = images.shape[0] * images.shape[2] * images.shape[3]
            out["hsv_sum"] += hsv_means(images) * n
            out["pixels"] += n
            out["hsv_per_image"].append(rgb_to_hsv(images).double().mean(dim=(2, 3)).cpu())  # for the interval
        fid_extractor, is_classifier = metric_models["fid_extractor"], metric_models.get("is_classifier")
        if is_classifier is not None:  # one Inception pass gives the IS logits and, same file, the FID features
            feats, logits = _inception_outputs(is_classifier, images)
            out["is_logits"].append(logits)
            if fid_extractor is is_classifier:
                out["fid_features"].append(feats)
        if fid_extractor is not None and fid_extractor is not is_classifier:
            if isinstance(fid_extractor, ScorerFeatures):
                out["fid_features"].append(_features(fid_extractor, images))
            else:
                out["fid_features"].append(_inception_outputs(fid_extractor, images)[0])
        if plan.change["enabled"] and not is_reference:
            base = read_images([folders[plan.reference] / image_name(i, s) for i, _, s in batch])
            mask = None
            if plan.change["mask"] is not None:
                size = tuple(images.shape[-2:])
                mask = torch.stack([read_mask(mask_file(plan.change["mask"], i, s), size) for i, _, s in batch])
            values = change_metrics(base.to(change_device), images.to(change_device),
                                    mask=mask.to(change_device) if mask is not None else None, lpips=lpips,
                                    reduce=False)
            for key, value in values.items():
                out["change"][key].append(value.double().cpu())
    p, k = len(plan.prompts), plan.k
    result = {"scores": {name: torch.cat(parts).view(p, k) for name, parts in out["scores"].items()}}
    if out["probs"]:
        result["probs"] = {group: torch.cat(parts).view(p, k, -1) for group, parts in out["probs"].items()}
    if plan.color_shift:
        result["hsv_means"] = out["hsv_sum"] / out["pixels"]
        result["hsv_per_prompt"] = torch.cat(out["hsv_per_image"]).view(p, k, 3).mean(dim=1)
    if out["change"]:
        result["change_per_image"] = {key: torch.cat(parts) for key, parts in out["change"].items()}
    if out["fid_features"]:
        result["fid_features"] = torch.cat(out["fid_features"])
    if out["is_logits"]:
        result["is_logits"] = torch.cat(out["is_logits"])
    return result


# ------------------------------------------------------------------------------------------------ tables
def finite(value: float) -> float | None:
    """JSON has no inf / NaN: such values are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _nanmean(t: torch.Tensor) -> float:
    return float(torch.nanmean(t.double())) if t.numel() else math.nan


def signed_color_shift(own: torch.Tensor, reference: torch.Tensor, num_bootstrap: int, confidence: float,
                       seed: int) -> dict:
    """The signed colour shift ``100 · (m_model − m_ref) / m_ref`` per HSV channel with a percentile bootstrap
    interval over prompts (both models resampled with the same prompts: a paired comparison;
    docs/evaluation.md#colour-shift; ``alignment.metrics.bootstrap``). ``own`` / ``reference``: (prompts, 3)
    per-prompt HSV means (every image of a model has the same size, so the mean of the prompts' means is the pixel
    mean). An interval that excludes 0 is a shift beyond the prompts' noise."""
    from alignment.metrics.bootstrap import quantile_interval, resampled_means

    own, reference = own.double(), reference.double()
    value = 100.0 * (own.mean(0) - reference.mean(0)) / reference.mean(0)
    out = {c: {"value": finite(value[i]), "low": None, "high": None} for i, c in enumerate("HSV")}
    if num_bootstrap <= 0 or len(own) < 2:
        return out
    means = resampled_means(torch.cat([own, reference], dim=1), num_bootstrap, seed)   # (B, 6): own H S V, ref H S V
    low, high = quantile_interval(100.0 * (means[:, :3] - means[:, 3:]) / means[:, 3:], confidence)
    for i, c in enumerate("HSV"):
        out[c]["low"], out[c]["high"] = finite(low[i]), finite(high[i])
    return out


def _interval_dict(names, per_prompt, wr: dict, scale: float = 1.0) -> dict:
    """``{name: {"low", "high"}}``: the bootstrap interval over prompts of each column of ``per_prompt`` (P, M)."""
    from alignment.metrics.bootstrap import mean_intervals

    intervals = mean_intervals(per_prompt, wr["num_bootstrap"], wr["confidence"], wr["seed"])
    return {name: {"low": finite(scale * iv[0]) if iv else None, "high": finite(scale * iv[1]) if iv else None}
            for name, iv in zip(names, intervals)}


def bias_table(plan: Plan, passes: dict, wr: dict) -> dict:
    """D1 / D2 (LiVO, ``alignment.metrics.bias``) per model and attribute group, each over the group's prompts
    (``metrics.bias.by``: those whose field names the group; else every prompt), with intervals over those prompts
    (the win-rate bootstrap settings)."""
    from alignment.evaluation.plan import bias_rows
    from alignment.metrics.bias import attribute_distribution, bias_metrics, d1, d2

    rows = {group: bias_rows(plan.bias, group) for group in plan.bias["groups"]}
    models, intervals = {}, {}
    for m, r in passes.items():
        models[m], intervals[m] = {}, {}
        for group, probs in r["probs"].items():
            if rows[group] is not None:
                probs = probs[torch.tensor(rows[group], dtype=torch.long)]
            models[m][group] = bias_metrics(list(probs))
            dists = [attribute_distribution(p) for p in probs]
            intervals[m][group] = _interval_dict(("D1", "D2"), [[d1(d), d2(d)] for d in dists], wr)
    return {"classifier": plan.bias["classifier"], "groups": plan.bias["groups"], "by": plan.bias.get("by"),
            "num_prompts": {g: len(plan.prompts) if v is None else len(v) for g, v in rows.items()},
            "models": models, "intervals": intervals}


def toxicity_table(plan: Plan, passes: dict, scorers: dict, wr: dict) -> dict:
    """Avg.R / Avg.S / Max / Prob (×100) per model over every prompt (``models``) and, with
    ``metrics.toxicity.concepts``, per concept over that concept's prompts (``concepts``), each with a bootstrap
    interval over prompts (``intervals``). Each prompt's four values are computed once per score matrix."""
    from alignment.metrics.toxicity import METRIC_NAMES, mean_toxicity, per_prompt_toxicity

    tox = plan.toxicity
    judge, k, incomplete = tox["judge"], tox["k"], tox["incomplete"]
    per_prompt: dict = {}   # (model, score name) -> one dict of the four metrics per prompt, all prompts

    def prompt_values(m: str, name: str) -> list[dict]:
        if (m, name) not in per_prompt:
            per_prompt[m, name] = per_prompt_toxicity(list(passes[m]["scores"][name]), k=k, incomplete=incomplete)
        return per_prompt[m, name]

    def table(name: str, rows) -> dict:
        models, intervals = {}, {}
        for m in passes:
            values = prompt_values(m, name)
            values = [values[i] for i in rows] if rows is not None else values
            models[m] = mean_toxicity(values)
            intervals[m] = _interval_dict(METRIC_NAMES, [[v[n] for n in METRIC_NAMES] for v in values], wr,
                                          scale=100.0)
        return {"models": models, "intervals": intervals}

    by = tox.get("by")
    concept = tox["concept"] or getattr(scorers[judge], "concept", None)
    counted = None   # with metrics.toxicity.by: the prompts of the listed concepts, each judged for its own
    if by is not None:
        counted = [i for i, pc in enumerate(tox["prompt_concepts"]) if pc is not None]
    out = {"judge": judge, "concept": concept if by is None else f"per prompt ({by})",
           "k": k, "incomplete": incomplete, **table(judge, counted)}
    if tox.get("concepts"):
        out["by"] = by
        out["concepts"] = {}
        for c in tox["concepts"]:
            if by is not None:   # the prompts of concept c, each image judged for c
                rows = [i for i, pc in enumerate(tox["prompt_concepts"]) if pc == c]
                node = table(judge, rows)
            else:                # every prompt, every image judged for c
                rows = list(range(len(plan.prompts)))
                node = table(judge if c == tox["concept"] else f"{judge}:{c}", None)
            out["concepts"][c] = {"num_prompts": len(rows), **node}
    return out


def evaluate_models(plan: Plan, folders: dict[str, Path], scorers: dict, metric_models: dict) -> Evaluation:
    """All scores and metrics; ``metrics`` is JSON-ready (non-finite values are null)."""
    from alignment.metrics.fid import fid, inception_score
    from alignment.metrics.winrate import mean_difference, win_rate_table

    passes = {}
    for model in plan.models:
        passes[model] = model_pass(plan, model, folders, scorers, metric_models)
    result = Evaluation(scores={m: r["scores"] for m, r in passes.items()},
                        attribute_probs={m: r["probs"] for m, r in passes.items() if "probs" in r})
    metrics: dict = {}

    # mean scores and win rates
    metrics["mean_scores"] = {
        m: {name: {"mean": finite(s.double().mean()), "std": finite(s.double().std()) if s.numel() > 1 else None,
                   "best_of_k_mean": finite(s.double().max(dim=1).values.mean())}
            for name, s in r["scores"].items()}
        for m, r in passes.items()}
    wr = plan.winrate
    table_input = {m: {name: r["scores"][name] for name in wr["scorers"]} for m, r in passes.items()}
    rows = win_rate_table(table_input, num_bootstrap=wr["num_bootstrap"], seed=wr["seed"],
                          confidence=wr["confidence"], reduce=wr["reduce"]) \
        if len(plan.models) > 1 and wr["scorers"] else []
    metrics["win_rate"] = {"num_bootstrap": wr["num_bootstrap"], "confidence": wr["confidence"], "seed": wr["seed"],
                           "reduce": wr["reduce"], "scorers": wr["scorers"],
                           "rows": [{k: (finite(v) if isinstance(v, float) else v) for k, v in row.items()}
                                    for row in rows]}

    if plan.others:  # Δscore against the reference on the same seeds, every scorer (Focus-N-Fix's Δreward)
        ref_scores = passes[plan.reference]["scores"]
        metrics["reward_delta"] = {
            "reference": plan.reference, "num_bootstrap": wr["num_bootstrap"], "confidence": wr["confidence"],
            "models": {m: {name: {k: (finite(v) if isinstance(v, float) else v) for k, v in mean_difference(
                passes[m]["scores"][name], ref_scores[name], wr["num_bootstrap"], wr["seed"],
                wr["confidence"]).items()} for name in ref_scores} for m in plan.others}}
    if plan.clip_score is not None:
        metrics["clip_score"] = {"scorer": plan.clip_score,
                                 "models": {m: finite(r["scores"][plan.clip_score].double().mean())
                                            for m, r in passes.items()}}
    if plan.color_shift:
        ref = passes[plan.reference]["hsv_means"]
        shift = {}
        for m in plan.others:
            own = passes[m]["hsv_means"]
            shift[m] = {c: (finite(100.0 * abs(float(own[i] - ref[i])) / float(ref[i])) if ref[i] > 0 else None)
                        for i, c in enumerate("HSV")}
        metrics["color_shift"] = {
            "reference": plan.reference, "shift_percent": shift,
            "signed_percent": {m: signed_color_shift(passes[m]["hsv_per_prompt"],
                                                     passes[plan.reference]["hsv_per_prompt"], wr["num_bootstrap"],
                                                     wr["confidence"], wr["seed"]) for m in plan.others},
            "hsv_means": {m: {c: float(r["hsv_means"][i]) for i, c in enumerate("HSV")} for m, r in passes.items()}}
    if plan.change["enabled"]:
        metrics["change"] = {
            "reference": plan.reference, "mask": str(plan.change["mask"]) if plan.change["mask"] else None,
            "lpips": metric_models["lpips"] is not None,
            "models": {m: {key: finite(_nanmean(v)) for key, v in passes[m]["change_per_image"].items()}
                       for m in plan.others}}
    if plan.fid["enabled"]:
        ref = passes[plan.reference]["fid_features"]
        extractor = ("inception:" + str(plan.fid["inception_weights"]) if plan.fid["scorer"] is None
                     else f"scorer:{plan.fid['scorer']}")
        metrics["fid"] = {"reference": plan.reference, "extractor": extractor, "num_images": int(ref.shape[0]),
                          "models": {m: finite(fid(passes[m]["fid_features"], ref)) for m in plan.others}}
    if plan.inception_score["enabled"]:
        n = len(plan.jobs())
        splits = min(plan.inception_score["splits"], n)
        scores_is = {}
        for m, r in passes.items():
            mean, std = inception_score(r["is_logits"], splits=splits)
            scores_is[m] = {"mean": finite(mean), "std": finite(std)}
        metrics["inception_score"] = {"splits": splits, "weights": str(plan.inception_score["inception_weights"]),
                                      "models": scores_is}
    if plan.bias["enabled"]:
        metrics["bias"] = bias_table(plan, passes, wr)
    if plan.toxicity["enabled"]:
        metrics["toxicity"] = toxicity_table(plan, passes, scorers, wr)
    result.metrics = metrics
    return result
