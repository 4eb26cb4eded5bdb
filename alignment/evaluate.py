"""Evaluation entry point: generate (or reuse) k images per prompt for several models, score them, write metrics.

    python -m alignment.evaluate                                  # the base tiny backbone on two demo prompts
    python -m alignment.evaluate prompts=/work/shared/data/PartiPrompts.tsv max_prompts=200 \\
        +models.dpo.adapter=outputs/dpo-tiny/<run> scorers=[clip] scorers.clip.model=/models/clip-vit-large-patch14
    python -m alignment.evaluate ... image_dir=eval_images/parti  # share generations between evaluations

Steps (docs/evaluation.md#protocol): (1) every model (the ``backbone`` with an optional LoRA, ``models.<name>``) gets
``k =
images_per_prompt`` images per prompt; image ``j`` of every prompt uses seed ``seed + j`` for every model, so the
comparison is paired. Images are cached in ``<image_dir>/<model>/`` with a manifest and reused whenever what defines
them is unchanged (``alignment.evaluation.cache``): re-scoring never re-generates. (2) Every configured scorer scores
every image; win rates of every ordered model pair per scorer (best of k, ties half, bootstrap interval), and the
paper metrics that are enabled (colour shift, change, FID / IS, CLIP score, LiVO bias and toxicity) against the
``reference`` model (``alignment.evaluation.scoring``). (3) Output in ``output_dir``: ``metrics.json`` (every number
and a summary of the config), ``scores.json`` (the per-image scores), ``report.html`` (self-contained), and W&B
tables when ``logger=wandb`` (offline by default).

Errors in the config (unknown scorer or model name, a missing adapter, prompt or weight file) are reported as one
line, ``error: <key>: ...``, exit status 2, before any model is built.

``retriever`` (off by default; ``retriever=lexicon|zero_shot|chat``) chooses LiVO's value per image for models
whose conditioner reads one (docs/methods.md#livo-inference); the value is part of each image's cache entry and
listed per image in ``scores.json`` (``extras``), the retriever's settings in ``metrics.json`` (``config``).

``prompt_filter.model`` (off by default) drops the prompts a text classifier calls unsafe before anything is
generated (``alignment.evaluation.prompt_filter``); ``metrics.json`` records them under ``prompt_filter``.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from alignment.cli import entry_point

def config_summary(cfg: DictConfig, plan) -> dict:
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return {"prompts": plan.prompt_source, "num_prompts": len(plan.prompts), "images_per_prompt": plan.k,
            "seeds": plan.seeds, "reference": plan.reference,
            "models": {name: spec.describe() for name, spec in plan.models.items()},
            "backbone": backbone, "sampler": plan.sampler, "num_inference_steps": plan.num_inference_steps,
            "guidance_scale": plan.guidance_scale, "negative_prompt": plan.negative_prompt,
            "scorers": plan.scorer_names, "image_dir": str(plan.image_dir),
            "prompt_filter": ({k: plan.prompt_filter[k] for k in ("model", "unsafe_labels", "threshold")}
                              if plan.prompt_filter else None),
            "retriever": plan.retriever}


def evaluate(cfg: DictConfig, extend=None) -> dict:
    """``extend(plan, evaluation, metrics)`` (optional; ``alignment.evaluate_checkpoints`` uses it) runs after
    metrics.json is written and may return ``{"html": <report section>, "log": fn(logger)}``: the section goes into
    report.html before the win rates, ``fn`` is called with the logger before it is closed."""
    from alignment.config import instantiate_checked, resolve_device
    from alignment.evaluation.cache import ModelImages, generate_missing, generation_settings
    from alignment.evaluation.plan import build_plan
    from alignment.evaluation.prompt_filter import describe_summary
    from alignment.evaluation.report import log_to_logger, render_report
    from alignment.evaluation.scoring import evaluate_models, finite, load_metric_models, write_problem_masks
    from alignment.files import atomic_write_text
    from alignment.loggers import build_logger
    from alignment.runs import describe_backbone
    from alignment.scorers.base import build_scorers

    # 1. Every check that needs no model, then the scorers and metric networks (their files), then generation.
    plan = build_plan(cfg)
    if plan.prompt_filter:
        print(f"prompt filter: {describe_summary(plan.prompt_filter)}")
    device = resolve_device(cfg.get("device"))
    backbone_node = OmegaConf.to_container(cfg.backbone, resolve=True)
    scorers = build_scorers(cfg.get("scorers"))
    metric_models = load_metric_models(plan, scorers, device)
    caches = {name: ModelImages(plan.image_dir, spec, generation_settings(plan, spec, backbone_node),
                                image_extras=plan.image_extras(spec.conditioner_extras)
                                if spec.conditioner_extras else None)
              for name, spec in plan.models.items()}
    counts = generate_missing(plan, caches, lambda: instantiate_checked(cfg.backbone, "backbone"), cfg.backbone,
                              device)
    for name, count in counts.items():
        print(f"images {name}: {count['generated']} generated, {count['reused']} reused ({caches[name].folder})")

    # 2. Scores and metrics.
    for scorer in scorers.values():
        scorer.to(device)
    folders = {name: cache.folder for name, cache in caches.items()}
    if plan.change["mask_from"]:  # masks made by a scorer from the reference's images, before any metric reads them
        plan.change["mask"] = write_problem_masks(plan, folders[plan.reference], scorers)
    evaluation = evaluate_models(plan, folders, scorers, metric_models)

    # 3. Outputs.
    out_dir = plan.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = config_summary(cfg, plan)
    metrics = {"config": summary, "generation": counts, **evaluation.metrics}
    if plan.prompt_filter:
        metrics["prompt_filter"] = plan.prompt_filter
    atomic_write_text(json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                      out_dir / "metrics.json")
    scores = {"prompts": plan.prompts, "seeds": plan.seeds,
              "scores": {m: {s: [[finite(v) for v in row] for row in t.tolist()] for s, t in per.items()}
                         for m, per in evaluation.scores.items()}}
    extras = {name: cache.image_extra for name, cache in caches.items() if cache.spec.conditioner_extras}
    if extras:  # the extras each image was sampled with (LiVO: the value used, after the retriever's draw)
        scores["extras"] = {m: {extra: [[get(i, seed).get(extra) for seed in plan.seeds]
                                        for i in range(len(plan.prompts))]
                                for extra in plan.models[m].conditioner_extras}
                            for m, get in extras.items()}
    if evaluation.attribute_probs:
        scores["attribute_probs"] = {m: {group: t.tolist() for group, t in per.items()}
                                     for m, per in evaluation.attribute_probs.items()}
    atomic_write_text(json.dumps(scores, ensure_ascii=False, allow_nan=False) + "\n", out_dir / "scores.json")
    extra = (extend(plan, evaluation, metrics) if extend is not None else None) or {}
    report_path = None
    if plan.report["enabled"]:
        report_path = out_dir / "report.html"
        atomic_write_text(render_report(plan, evaluation, folders, {"backbone": describe_backbone(backbone_node)},
                                        extra_html=extra.get("html", "")),
                  report_path)
    logger = build_logger(cfg, out_dir)
    if logger:
        log_to_logger(logger, plan, evaluation, folders, extra=extra.get("log"))

    per_prompt = "best of k" if metrics["win_rate"].get("reduce", "best") == "best" else "mean of k"
    for row in metrics["win_rate"]["rows"]:
        interval = (f" [{100 * row['low']:.1f}, {100 * row['high']:.1f}]" if row["low"] is not None
                    and row["high"] is not None else "")
        print(f"win rate ({row['scorer']}, {per_prompt}): {row['model_a']} over {row['model_b']} "
              f"{100 * row['rate']:.1f}%"
              f"{interval} (W/T/L {row['wins']}/{row['ties']}/{row['losses']} of {row['num_prompts']} prompts)")
    generated = sum(c["generated"] for c in counts.values())
    reused = sum(c["reused"] for c in counts.values())
    report_note = f"; report {report_path}" if report_path else ""
    print(f"done: {len(plan.models)} model(s) x {len(plan.prompts)} prompt(s) x {plan.k} image(s) "
          f"({generated} generated, {reused} reused); metrics {out_dir / 'metrics.json'}{report_note}")
    return {"output_dir": str(out_dir), "metrics": str(out_dir / "metrics.json"),
            "report": str(report_path) if report_path else None, "generated": generated, "reused": reused}


@entry_point("evaluate")
def main(cfg: DictConfig):
    return evaluate(cfg)


if __name__ == "__main__":
    main()
