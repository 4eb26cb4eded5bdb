"""Outputs besides metrics.json: a self-contained HTML report and the W&B tables.

``report.html`` opens in a browser from disk, without a server, scripts or other files: inline CSS, every image
embedded as a base64 ``data:`` URI (the cached PNG itself when it is at most ``report.thumbnail`` pixels on its
longer side, else a JPEG thumbnail of that size). From the top: the run's settings, the win-rate matrices (rate of
the row model over the column model, 95 % interval, wins/ties/losses), mean scores, the other metrics, then one
section per prompt with the models side by side (one column per model, one row per seed, each image with its scores
under it, and a best-of-k row); with the prompt safety filter on, its counts and the dropped prompts (collapsed).
Every piece of user text (prompts, names, paths) goes through ``html.escape``.
Images are shown for the first ``report.max_prompts`` prompts; every prompt is scored.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from alignment.evaluation.plan import Plan
from alignment.evaluation.scoring import Evaluation

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:center}
th{background:#f3f3f3}td.l,th.l{text-align:left}.muted{color:#777}.na{color:#aaa}
.prompt{margin:1.2em 0;padding-top:.4em;border-top:1px solid #eee}
.grid td{vertical-align:top}.grid img{width:160px;height:auto;image-rendering:auto;display:block;margin:auto}
.s{font-size:.8em;color:#333;white-space:nowrap}.best{font-weight:bold;background:#e8f5e9}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}dd{margin:0}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<span class="na">n/a</span>'
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:  # e.g. a tiny FID: keep its significant digits
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return esc(value)


def image_data_uri(path: Path, thumbnail: int) -> str:
    """The cached PNG as a data URI (itself when small enough, else a JPEG thumbnail)."""
    from PIL import Image

    with Image.open(path) as image:
        if max(image.size) <= thumbnail:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        small = image.convert("RGB")
        small.thumbnail((thumbnail, thumbnail), Image.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def table(headers: list[str], rows: list[list[str]], first_left: bool = True) -> str:
    """``headers`` and ``rows`` are already HTML (escape text before)."""
    head = "".join(f'<th{" class=l" if first_left and j == 0 else ""}>{h}</th>' for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td{" class=l" if first_left and j == 0 else ""}>{c}</td>'
                                    for j, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _rate_colour(rate: float) -> str:
    """Green above 50 %, red below (background of a win-rate cell)."""
    hue = 120 if rate >= 0.5 else 0
    strength = min(1.0, abs(rate - 0.5) * 2)
    return f"hsl({hue},60%,{97 - 22 * strength:.0f}%)"


def winrate_section(metrics: dict, models: list[str]) -> str:
    wr = metrics.get("win_rate", {})
    rows = wr.get("rows", [])
    if not rows:
        return "<p class=muted>No win rates (they need two models and a win-rate scorer: scorers=[...]).</p>"
    level = round(100 * wr.get("confidence", 0.95))
    per_prompt = "best of k images" if wr.get("reduce", "best") == "best" else "mean score of the k images"
    parts = [f"<p class=muted>Cell: win rate of the <b>row</b> model over the <b>column</b> model ({per_prompt} "
             f"per prompt, ties count half), {level}% bootstrap interval over prompts "
             f"({wr.get('num_bootstrap')} resamples), and wins/ties/losses.</p>"]
    for scorer in wr.get("scorers", []):
        by_pair = {(r["model_a"], r["model_b"]): r for r in rows if r["scorer"] == scorer}
        body = []
        for a in models:
            cells = [f"<b>{esc(a)}</b>"]
            for b in models:
                r = by_pair.get((a, b))
                if r is None:
                    cells.append("<span class=na>&mdash;</span>")
                    continue
                interval = (f"[{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
                            if r.get("low") is not None and r.get("high") is not None else "")
                cells.append(f'<div style="background:{_rate_colour(r["rate"])}"><b>{100 * r["rate"]:.1f}%</b> '
                             f'{interval}<br><span class=s>{r["wins"]}/{r["ties"]}/{r["losses"]} of '
                             f'{r["num_prompts"]}</span></div>')
            body.append(cells)
        parts.append(f"<h3>{esc(scorer)}</h3>" + table(["A \\ B"] + [esc(m) for m in models], body))
    return "".join(parts)


def metrics_sections(metrics: dict) -> str:
    parts = []
    mean = metrics.get("mean_scores", {})
    scorers = sorted({s for per in mean.values() for s in per})
    if scorers:
        rows = [[f"<b>{esc(m)}</b>"] + [f'{fmt(per[s]["mean"])} &plusmn; {fmt(per[s]["std"])}<br><span class=s>'
                                        f'best of k {fmt(per[s]["best_of_k_mean"])}</span>' if s in per else ""
                                        for s in scorers] for m, per in mean.items()]
        parts.append("<h2>Mean scores</h2>" + table(["model"] + [esc(s) for s in scorers], rows))
    if "clip_score" in metrics:
        cs = metrics["clip_score"]
        parts.append(f"<h2>CLIP score ({esc(cs['scorer'])})</h2>"
                     + table(["model", "CLIP score"], [[esc(m), fmt(v, 2)] for m, v in cs["models"].items()]))
    if "color_shift" in metrics:
        cs = metrics["color_shift"]
        rows = [[esc(m)] + [fmt(v[c], 4) for c in "HSV"] + [fmt(cs["shift_percent"][m][c], 2) if m in
                                                             cs["shift_percent"] else "&mdash;" for c in "HSV"]
                for m, v in cs["hsv_means"].items()]
        parts.append(f"<h2>Colour shift vs {esc(cs['reference'])} (HG-DPO)</h2>"
                     + table(["model", "mean H", "mean S", "mean V", "&Delta;H %", "&Delta;S %", "&Delta;V %"], rows))
    if metrics.get("reward_delta", {}).get("models"):
        rd = metrics["reward_delta"]
        names = list(next(iter(rd["models"].values())))

        def cell(v):
            interval = (f' <span class=muted>[{fmt(v["low"])}, {fmt(v["high"])}]</span>'
                        if v["low"] is not None and v["high"] is not None else "")
            return f'{fmt(v["value"])}{interval}'

        rows = [[esc(m)] + [cell(per[n]) for n in names] for m, per in rd["models"].items()]
        parts.append(f"<h2>&Delta;score vs {esc(rd['reference'])} (same seeds, mean over prompts, "
                     f"{int(100 * rd['confidence'])} % interval)</h2>" + table(["model"] + [esc(n) for n in names],
                                                                              rows))
    if "change" in metrics and metrics["change"]["models"]:
        ch = metrics["change"]
        keys = list(next(iter(ch["models"].values())))
        rows = [[esc(m)] + [fmt(v.get(k), 4) for k in keys] for m, v in ch["models"].items()]
        note = "" if ch["lpips"] else " <span class=muted>(no LPIPS: set metrics.change.lpips_weights)</span>"
        parts.append(f"<h2>Change vs {esc(ch['reference'])} (same seeds){note}</h2>"
                     + table(["model"] + [esc(k) for k in keys], rows))
    if "fid" in metrics:
        f = metrics["fid"]
        parts.append(f"<h2>FID vs {esc(f['reference'])}</h2><p class=muted>features: {esc(f['extractor'])}; "
                     f"{f['num_images']} images per model</p>"
                     + table(["model", "FID"], [[esc(m), fmt(v, 3)] for m, v in f["models"].items()]))
    if "inception_score" in metrics:
        i = metrics["inception_score"]
        parts.append(f"<h2>Inception Score</h2><p class=muted>{i['splits']} splits</p>"
                     + table(["model", "IS", "std"], [[esc(m), fmt(v["mean"]), fmt(v["std"])]
                                                    for m, v in i["models"].items()]))
    if "bias" in metrics:
        b = metrics["bias"]
        groups = list(b["groups"])
        headers = ["model"] + [f"{esc(g)} {d}" for g in groups for d in ("D1", "D2")]
        rows = [[esc(m)] + [fmt(v[g][d]) for g in groups for d in ("D1", "D2")] for m, v in b["models"].items()]
        described = "; ".join(f"{g}: {', '.join(a)}" for g, a in b["groups"].items())
        if b.get("by"):   # metrics.bias.by: each group over the prompts whose field names it
            described += "; prompts selected by their " + b["by"] + ": " + ", ".join(
                f"{g} {n}" for g, n in b["num_prompts"].items())
        parts.append(f"<h2>Bias (LiVO D1, D2)</h2><p class=muted>classifier {esc(b['classifier'])}; "
                     f"{esc(described)}</p>" + table(headers, rows))
    if "toxicity" in metrics:
        t = metrics["toxicity"]
        names = ["Avg.R", "Avg.S", "Max", "Prob"]
        parts.append(f"<h2>Toxicity ({esc(t['concept'])}, k = {t['k']})</h2>"
                     + table(["model"] + names, [[esc(m)] + [fmt(v[n], 2) for n in names]
                                                 for m, v in t["models"].items()]))
        if t.get("concepts"):  # LiVO Table 2: per concept, over that concept's prompts (metrics.toxicity.concepts)
            rows = [[esc(m), esc(c), str(node["num_prompts"])] + [fmt(node["models"][m][n], 2) for n in names]
                    for c, node in t["concepts"].items() for m in node["models"]]
            selected = (f"prompts selected by their {esc(t['by'])}" if t.get("by")
                        else "every prompt, judged for each concept")
            parts.append(f"<h3>Toxicity per concept</h3><p class=muted>{selected}</p>"
                         + table(["model", "concept", "prompts"] + names, rows))
    return "".join(parts)


def prompt_sections(plan: Plan, evaluation: Evaluation, folders: dict[str, Path]) -> str:
    from alignment.files import image_name

    models = list(plan.models)
    shown = min(len(plan.prompts), plan.report["max_prompts"])
    parts = [f"<h2>Images</h2><p class=muted>{shown} of {len(plan.prompts)} prompts shown; {plan.k} seeds "
             f"({', '.join(map(str, plan.seeds))}), the same for every model.</p>"]
    scorers = list(next(iter(evaluation.scores.values())).keys()) if evaluation.scores else []
    for i in range(shown):
        rows = []
        for j, seed in enumerate(plan.seeds):
            cells = [f"seed {seed}"]
            for m in models:
                uri = image_data_uri(folders[m] / image_name(i, seed), plan.report["thumbnail"])
                scores = "".join(f"<div class=s>{esc(s)} {fmt(float(evaluation.scores[m][s][i, j]))}</div>"
                                 for s in scorers)
                cells.append(f'<img src="{uri}" alt="{esc(m)}, seed {seed}">{scores}')
            rows.append(cells)
        if scorers and plan.k > 1:
            best_cells = ["best of k"]
            best = {s: max(float(evaluation.scores[m][s][i].max()) for m in models) for s in scorers}
            for m in models:
                lines = []
                for s in scorers:
                    value = float(evaluation.scores[m][s][i].max())
                    cls = " best" if len(models) > 1 and value == best[s] else ""
                    lines.append(f"<div class='s{cls}'>{esc(s)} {fmt(value)}</div>")
                best_cells.append("".join(lines))
            rows.append(best_cells)
        grid = table([""] + [esc(m) for m in models], rows)
        parts.append(f'<section class=prompt id="prompt-{i}"><h3>#{i}: {esc(plan.prompts[i])}</h3>'
                     f'<div class=grid>{grid}</div></section>')
    return "".join(parts)


def dropped_section(plan: Plan, shown: int = 50) -> str:
    """The prompts the safety filter dropped (collapsed; the first ``shown``), or nothing."""
    dropped = (plan.prompt_filter or {}).get("dropped_prompts") or []
    if not dropped:
        return ""
    items = "".join(f"<li>#{d['index']} <span class=s>(p {fmt(d['p_unsafe'])})</span> {esc(d['prompt'])}</li>"
                    for d in dropped[:shown])
    more = f"<p class=muted>... and {len(dropped) - shown} more (metrics.json)</p>" if len(dropped) > shown else ""
    return (f"<details><summary>{len(dropped)} prompt(s) dropped by the safety filter (numbered by their place in "
            f"the prompt file; the kept prompts are renumbered 0..{len(plan.prompts) - 1})</summary><ul>{items}</ul>"
            f"{more}</details>")


def render_report(plan: Plan, evaluation: Evaluation, folders: dict[str, Path], summary: dict,
                  extra_html: str = "") -> str:
    models = list(plan.models)
    settings = [("prompts", f"{len(plan.prompts)} from {plan.prompt_source}"),
                ("images per prompt", f"{plan.k} (seeds {', '.join(map(str, plan.seeds))})"),
                ("backbone", summary.get("backbone", "")),
                ("sampling", f"DDIM, {plan.num_inference_steps} steps, guidance {plan.guidance_scale:g}"
                             + (f", negative prompt {plan.negative_prompt!r}" if plan.negative_prompt else "")),
                ("reference", plan.reference)]
    for name, spec in plan.models.items():
        parts = [f"run {spec.run}"] if spec.run else []
        parts += [f"LoRA {spec.adapter} (scale {spec.lora_scale:g})"] if spec.adapter and not spec.run else []
        parts += [f"LoRA scale {spec.lora_scale:g}"] if spec.adapter and spec.run else []
        parts += ["full UNet"] if spec.unet else []
        parts += ["conditioner"] if spec.conditioner else []
        parts += ["LAN against the base model"] if spec.lan else []
        settings.append((f"model {name}", ", ".join(parts) if parts else "none (base)"))
    if plan.prompt_filter:
        from alignment.evaluation.prompt_filter import describe_summary

        settings.insert(1, ("prompt filter", describe_summary(plan.prompt_filter)))
    info = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in settings)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>Evaluation: {esc(', '.join(models))}</title><style>{CSS}</style></head><body>"
            f"<h1>Evaluation: {esc(' vs '.join(models))}</h1><dl>{info}</dl>{dropped_section(plan)}{extra_html}"
            f"<h2>Win rates</h2>{winrate_section(evaluation.metrics, models)}"
            f"{metrics_sections(evaluation.metrics)}"
            f"{prompt_sections(plan, evaluation, folders)}</body></html>\n")


# ------------------------------------------------------------------------------------------------ W&B
def flat_scalars(metrics: dict) -> dict[str, float]:
    """The summary numbers as ``group/.../name`` scalars (finite ones only), for any Lightning logger."""
    out: dict[str, float] = {}
    for row in metrics.get("win_rate", {}).get("rows", []):
        base = f"win_rate/{row['scorer']}/{row['model_a']}_vs_{row['model_b']}"
        for key in ("rate", "low", "high"):
            if row.get(key) is not None:
                out[f"{base}/{key}"] = float(row[key])

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            out[prefix] = float(node)

    for group in ("mean_scores", "reward_delta", "clip_score", "color_shift", "change", "fid", "inception_score",
                  "bias", "toxicity"):
        if group in metrics:
            node = metrics[group]
            if group == "mean_scores":
                walk(group, node)
            else:
                walk(group, {k: v for k, v in node.items()
                             if k in ("models", "shift_percent", "hsv_means", "concepts")})
    return out


def log_to_logger(logger, plan: Plan, evaluation: Evaluation, folders: dict[str, Path], extra=None) -> None:
    """Summary scalars to any Lightning logger; with W&B also a table of every shown image (prompt, model, seed,
    image, one column per scorer) and the win-rate table. ``extra(logger)``: more to log before the logger closes."""
    from alignment.files import image_name

    logger.log_metrics(flat_scalars(evaluation.metrics), step=0)
    experiment = getattr(logger, "experiment", None)
    if type(logger).__name__ == "WandbLogger" and experiment is not None:
        import wandb

        scorers = list(next(iter(evaluation.scores.values())).keys()) if evaluation.scores else []
        images = wandb.Table(columns=["prompt_index", "prompt", "model", "seed", "image", *scorers])
        for i in range(min(len(plan.prompts), plan.report["max_prompts"])):
            for m in plan.models:
                for j, seed in enumerate(plan.seeds):
                    images.add_data(i, plan.prompts[i], m, seed, wandb.Image(str(folders[m] / image_name(i, seed))),
                                    *[float(evaluation.scores[m][s][i, j]) for s in scorers])
        columns = ["scorer", "model_a", "model_b", "rate", "low", "high", "wins", "ties", "losses", "num_prompts"]
        rates = wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                   for r in evaluation.metrics.get("win_rate", {}).get("rows", [])])
        experiment.log({"evaluation/images": images, "evaluation/win_rate": rates})
    if extra is not None:
        extra(logger)
    logger.finalize("success")
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()
