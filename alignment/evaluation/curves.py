"""Metrics against training step (or a run setting): one row per evaluated checkpoint, line plots with interval
bands (docs/evaluation.md#curves-over-checkpoints).

``python -m alignment.evaluate_checkpoints`` evaluates several models of one or more runs in one ``evaluate`` pass;
this module turns that pass's ``metrics.json`` into curves:

- ``point_metrics(metrics, model, fixed)``: every number ``metrics.json`` holds for one model, as
  ``{name: {"value", "low", "high"}}`` (``low`` / ``high``: the interval when the metric has one — win rates, Δscore,
  signed colour shift, bias D1 / D2, toxicity; the Inception Score's band is mean ± std over splits);
- ``write_curves``: ``curves.json`` and ``curves.csv`` (one row per point) and one SVG per metric under ``curves/``
  (written by hand: no plotting library needed), returned as a report section and a W&B logging function.

The fixed models of the evaluation (``models``, by default the base backbone) are drawn as dashed horizontal lines.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignment.files import atomic_write_text

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
LOWER_IS_BETTER = ("fid", "bias/", "toxicity/", "change/lpips")


@dataclass
class Point:
    """One evaluated model on a curve: its series (a run, or a step when ``x`` is a run setting) and its x value."""

    model: str           # the model's name in the evaluation (its image folder)
    series: str
    x: float
    run: str
    step: int | None
    metrics: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ extraction
def _entry(value, low=None, high=None) -> dict | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high))
    return {"value": float(value), "low": float(low) if ok else None, "high": float(high) if ok else None}


def _interval(node, name):
    """``node[name]`` as (low, high) from ``{"low", "high"}`` or ``[low, high]`` (None, None when absent)."""
    value = (node or {}).get(name) if isinstance(node, dict) else None
    if isinstance(value, dict):
        return value.get("low"), value.get("high")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0], value[1]
    return None, None


def point_metrics(metrics: dict, model: str, fixed: list[str]) -> dict[str, dict]:
    """Every number of ``model`` in an evaluation's ``metrics`` as ``{name: {value, low, high}}`` (see the module
    docstring); win rates are those of ``model`` over each of the ``fixed`` models."""
    out: dict[str, dict | None] = {}
    for scorer, node in metrics.get("mean_scores", {}).get(model, {}).items():
        out[f"mean/{scorer}"] = _entry(node.get("mean"))
        out[f"best_of_k/{scorer}"] = _entry(node.get("best_of_k_mean"))
    for row in metrics.get("win_rate", {}).get("rows", []):
        if row.get("model_a") == model and row.get("model_b") in fixed:
            out[f"win_rate/{row['scorer']}/over_{row['model_b']}"] = _entry(row.get("rate"), row.get("low"),
                                                                            row.get("high"))
    for scorer, node in metrics.get("reward_delta", {}).get("models", {}).get(model, {}).items():
        out[f"delta/{scorer}"] = _entry(node.get("value"), node.get("low"), node.get("high"))
    if "clip_score" in metrics:
        out["clip_score"] = _entry(metrics["clip_score"]["models"].get(model))
    if "fid" in metrics:
        out["fid"] = _entry(metrics["fid"]["models"].get(model))
    if "inception_score" in metrics:
        node = metrics["inception_score"]["models"].get(model) or {}
        mean, std = node.get("mean"), node.get("std")
        ok = isinstance(mean, (int, float)) and isinstance(std, (int, float))
        out["inception_score"] = _entry(mean, mean - std if ok else None, mean + std if ok else None)
    if "bias" in metrics:
        bias = metrics["bias"]
        for group, values in (bias["models"].get(model) or {}).items():
            intervals = (bias.get("intervals") or {}).get(model, {}).get(group, {})
            for name in ("D1", "D2"):
                out[f"bias/{group}/{name}"] = _entry(values.get(name), *_interval(intervals, name))
    if "toxicity" in metrics:
        tox = metrics["toxicity"]
        per_concept = tox.get("concepts") or {}
        sources = ({concept: node for concept, node in per_concept.items()} if per_concept
                   else {tox.get("concept") or "all": tox})
        for concept, node in sources.items():
            values = (node.get("models") or {}).get(model) or {}
            intervals = (node.get("intervals") or {}).get(model, {})
            for name, value in values.items():
                out[f"toxicity/{concept}/{name}"] = _entry(value, *_interval(intervals, name))
    if "color_shift" in metrics:
        for channel, node in (metrics["color_shift"].get("signed_percent", {}).get(model) or {}).items():
            out[f"color_shift/{channel}"] = _entry(node.get("value"), node.get("low"), node.get("high"))
    if "change" in metrics:
        for key, value in (metrics["change"]["models"].get(model) or {}).items():
            out[f"change/{key}"] = _entry(value)
    return {name: entry for name, entry in out.items() if entry is not None}


def select_metrics(names: list[str], wanted) -> list[str]:
    """The metric names to plot: all, or those starting with one of ``wanted`` (e.g. ``[win_rate, bias/gender]``)."""
    if not wanted:
        return names
    return [n for n in names if any(n == w or n.startswith(w.rstrip("/") + "/") for w in wanted)]


# ------------------------------------------------------------------------------------------------ SVG
def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high - low <= 0:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def svg_plot(title: str, series: dict[str, list[tuple[float, dict]]], references: dict[str, float],
             x_label: str, width: int = 520, height: int = 320) -> str:
    """A line plot as an SVG string: ``series`` name -> [(x, {value, low, high})] drawn as lines with markers and a
    shaded band where low / high are known; ``references`` name -> value as dashed horizontal lines."""
    left, right, top, bottom = 62, 150, 30, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for points in series.values() for x, _ in points]
    ys = [v for points in series.values() for _, e in points
          for v in (e["value"], e["low"], e["high"]) if v is not None]
    ys += list(references.values())
    x_ticks = nice_ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
    y_ticks = nice_ticks(min(ys), max(ys)) if ys else [0.0, 1.0]
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="13" font-weight="bold">{esc(title)}</text>']
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + plot_h}" stroke="#eee"/>'
                     f'<text x="{px(t):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{_label(t)}</text>')
    for t in y_ticks:
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + plot_w}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
                 f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>')
    legend_y = top + 4
    for i, (name, value) in enumerate(references.items()):
        colour = "#555"
        parts.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{left + plot_w}" y2="{py(value):.1f}" '
                     f'stroke="{colour}" stroke-dasharray="5,4"/>')
        parts.append(f'<line x1="{left + plot_w + 10}" y1="{legend_y + 4}" x2="{left + plot_w + 28}" '
                     f'y2="{legend_y + 4}" stroke="{colour}" stroke-dasharray="5,4"/>'
                     f'<text x="{left + plot_w + 32}" y="{legend_y + 8}">{esc(name)}</text>')
        legend_y += 16
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = sorted(points, key=lambda p: p[0])
        banded = [(x, e) for x, e in points if e["low"] is not None and e["high"] is not None]
        if len(banded) >= 2:
            outline = [f"{px(x):.1f},{py(e['high']):.1f}" for x, e in banded]
            outline += [f"{px(x):.1f},{py(e['low']):.1f}" for x, e in reversed(banded)]
            parts.append(f'<polygon points="{" ".join(outline)}" fill="{colour}" fill-opacity="0.18" stroke="none"/>')
        for x, e in banded:  # whiskers: visible also for a single point
            parts.append(f'<line x1="{px(x):.1f}" y1="{py(e["low"]):.1f}" x2="{px(x):.1f}" y2="{py(e["high"]):.1f}" '
                         f'stroke="{colour}" stroke-opacity="0.6"/>')
        if len(points) >= 2:
            line = " ".join(f"{px(x):.1f},{py(e['value']):.1f}" for x, e in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, e in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(e["value"]):.1f}" r="3" fill="{colour}">'
                         f'<title>{esc(name)}: x={_label(x)}, {e["value"]:.4g}</title></circle>')
        parts.append(f'<rect x="{left + plot_w + 10}" y="{legend_y}" width="18" height="8" fill="{colour}"/>'
                     f'<text x="{left + plot_w + 32}" y="{legend_y + 8}">{esc(name)}</text>')
        legend_y += 16
    parts.append("</svg>")
    return "".join(parts)


def file_stem(metric: str) -> str:
    """A metric name as a file name (``win_rate/clip/over_base`` -> ``win_rate__clip__over_base``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("/", "__"))


# ------------------------------------------------------------------------------------------------ outputs
def write_curves(points: list[Point], metrics: dict, fixed: list[str], x_label: str, out_dir: Path,
                 wanted=None) -> dict:
    """``curves.json``, ``curves.csv`` and ``curves/<metric>.svg`` in ``out_dir``; returns ``{"html", "log",
    "names"}`` (the report section, a function that logs to a Lightning logger, the plotted metric names)."""
    for point in points:
        point.metrics = point_metrics(metrics, point.model, fixed)
    references = {m: point_metrics(metrics, m, fixed) for m in fixed}
    names = select_metrics(list(dict.fromkeys(n for p in points for n in p.metrics)), wanted)
    rows = [{"series": p.series, "model": p.model, "run": p.run, "step": p.step, "x": p.x,
             "metrics": {n: p.metrics[n] for n in names if n in p.metrics}} for p in points]
    atomic_write_text(json.dumps({"x": x_label, "fixed_models": fixed, "metrics": names, "points": rows,
                                  "references": {m: {n: v for n, v in r.items() if n in names}
                                                 for m, r in references.items()}},
                                 indent=2, allow_nan=False) + "\n", out_dir / "curves.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [c for n in names for c in (n, f"{n}.low", f"{n}.high")]
    against_step = x_label == "step"   # then the x column is the step column
    writer.writerow(["series", "model", "run", "step", *([] if against_step else [x_label]), *columns])
    for row in rows:
        values = []
        for n in names:
            entry = row["metrics"].get(n) or {}
            values += [entry.get("value"), entry.get("low"), entry.get("high")]
        writer.writerow([row["series"], row["model"], row["run"], row["step"], *([] if against_step else [row["x"]]),
                         *["" if v is None else v for v in values]])
    atomic_write_text(buffer.getvalue(), out_dir / "curves.csv")

    svgs = {}
    folder = out_dir / "curves"
    for name in names:
        series: dict[str, list] = {}
        for p in points:
            if name in p.metrics:
                series.setdefault(p.series, []).append((p.x, p.metrics[name]))
        refs = {m: r[name]["value"] for m, r in references.items() if name in r}
        if name.startswith("win_rate/"):   # the opponent against itself: a tie
            refs[f"{name.rsplit('/over_', 1)[-1]} (tie)"] = 0.5
        hint = " (lower is better)" if name.startswith(LOWER_IS_BETTER) else ""
        svgs[name] = svg_plot(name + hint, series, refs, x_label)
        atomic_write_text(svgs[name] + "\n", folder / f"{file_stem(name)}.svg")

    def section() -> str:
        esc = html.escape
        described = (f"{len(points)} model(s) of {len({p.run for p in points})} run(s) against {esc(x_label)}; "
                     f"dashed: {esc(', '.join(fixed))}; shaded: the metric's interval where it has one "
                     f"(curves.csv, curves.json, curves/*.svg)")
        body = "".join(f'<figure style="display:inline-block;margin:.3em">{svg}</figure>' for svg in svgs.values())
        return f"<h2>Curves</h2><p class=muted>{described}</p><div>{body}</div>"

    def log(logger) -> None:
        log_curves(logger, rows, names, svgs, x_label)

    return {"html": section(), "log": log, "names": names}


def log_curves(logger, rows: list[dict], names: list[str], svgs: dict[str, str], x_label: str) -> None:
    """To any Lightning logger: with ``x = step``, each point's metrics as ``curves/<series>/<metric>`` at its step
    (native line charts in W&B, rows in CSV); with W&B also the table of points and every plot (as HTML)."""
    if x_label == "step":
        for step in sorted({r["step"] for r in rows if r["step"] is not None}):
            scalars = {f"curves/{r['series']}/{n}": e["value"] for r in rows if r["step"] == step
                       for n, e in r["metrics"].items()}
            if scalars:
                logger.log_metrics(scalars, step=int(step))
    experiment = getattr(logger, "experiment", None)
    if type(logger).__name__ == "WandbLogger" and experiment is not None:
        import wandb

        columns = ["series", "model", "run", "step", x_label, *names]
        table = wandb.Table(columns=columns, data=[
            [r["series"], r["model"], r["run"], r["step"], r["x"],
             *[(r["metrics"].get(n) or {}).get("value") for n in names]] for r in rows])
        experiment.log({"evaluation/curves": table,
                        **{f"curves_plots/{file_stem(n)}": wandb.Html(svg) for n, svg in svgs.items()}})
