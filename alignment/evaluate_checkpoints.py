"""Evaluate a run's saved checkpoints (or several runs) and plot every metric against step or a run setting.

    python -m alignment.evaluate_checkpoints run=outputs/livo-tiny/<run> steps=all       # LiVO Fig. 4: convergence
    python -m alignment.evaluate_checkpoints run=<run> steps=[100,200,400] scorers=[clip]
    python -m alignment.evaluate_checkpoints runs=[<run a>,<run b>,<run c>] x=dataset.fraction   # Fig. 3a

The config is ``conf/evaluate_checkpoints.yaml``: ``conf/evaluate.yaml`` whole (prompts, seeds, scorers, metrics,
image cache, report, logger) plus ``run`` / ``runs``, ``steps``, ``x`` and ``curves``. Every selected checkpoint
becomes one more model of a single ``alignment.evaluate`` pass, next to the configured ``models`` (by default the
base backbone, the reference), so every checkpoint is scored with the same prompts, seeds, scorers and metrics, and
its images are cached under its own name (``step_000100``; ``<run>-step_000100`` with several runs): a rerun, or a
rerun with more steps, generates only what is new.

Checkpoints are the safetensors weight exports training writes with ``checkpoint.weights_every_n_steps=N``
(``<run>/checkpoints/step_NNNNNN/``, each a run folder of its own; Lightning's ``.ckpt`` files are never read);
``steps=final`` is the run's own export at the end of training. Besides ``evaluate``'s outputs, ``curves.json`` /
``curves.csv`` (one row per checkpoint) and ``curves/<metric>.svg`` are written and shown in report.html (docs/
evaluation.md#curves-over-checkpoints). Bad input (no run, a run without checkpoints, a step that was not saved, a
run without the ``x`` key) is a one-line error before any model loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from alignment.cli import entry_point
from alignment.errors import ConfigError

FINAL = "final"


def _runs(cfg: DictConfig) -> list[Path]:
    run, runs = cfg.get("run"), cfg.get("runs")
    if run not in (None, "") and runs not in (None, ""):
        raise ConfigError("run / runs: set run=<run folder> or runs=[<folder>, ...], not both")
    if runs in (None, ""):
        if run in (None, ""):
            raise ConfigError("run: required, the training run folder whose checkpoints to evaluate "
                              "(run=outputs/<method>-<backbone>/<time>, or runs=[...])")
        runs = [run]
    if isinstance(runs, str):
        runs = [runs]
    if not isinstance(runs, (ListConfig, list)) or not runs:
        raise ConfigError(f"runs must be a list of training run folders, got {runs!r}")
    folders = []
    for i, value in enumerate(runs):
        key = "run" if run not in (None, "") else f"runs[{i}]"
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be the path of a training run folder, got {value!r}")
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{key}: {folder} is not a folder")
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"{key}: {folder} is not a training run folder (no config.yaml)")
        if folder.absolute() in [f.absolute() for f in folders]:
            raise ConfigError(f"{key}: {folder} is listed twice")
        folders.append(folder)
    return folders


def _steps(value, x: str) -> list[int] | str:
    """``steps``: ``all`` | ``final`` | a list of step numbers (one number: a list of one); null: ``all`` against
    step, else ``final``."""
    if value is None:
        return "all" if x == "step" else FINAL
    if value in ("all", FINAL):
        return value
    values = [value] if isinstance(value, (int, str)) else value
    if not isinstance(values, (ListConfig, list)) or not values:
        raise ConfigError(f"steps must be all, final or a list of step numbers, got {value!r}")
    steps = []
    for v in values:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"steps: {v!r} is not a step number (>= 1); give all, final or e.g. steps=[100,200]")
        steps.append(v)
    return sorted(set(steps))


def _final_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _x_value(folder: Path, x: str, key: str) -> float:
    try:
        node = OmegaConf.load(folder / "config.yaml")
        value = OmegaConf.select(node, x, throw_on_missing=False)
    except Exception as err:  # noqa: BLE001 - an unreadable config.yaml
        raise ConfigError(f"{key}: cannot read {x} from {folder / 'config.yaml'} ({err})") from None
    if value is None:
        raise ConfigError(f"x: {x} is not set in {folder / 'config.yaml'} ({key}); x is step or a key of every "
                          f"run's config.yaml, e.g. x=dataset.fraction")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"x: {x} of {folder} is {value!r}, not a number")
    return float(value)


def _labels(folders: list[Path]) -> list[str]:
    """A model-name-safe, unique label per run folder (its folder name)."""
    labels = []
    for folder in folders:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.absolute().name).strip("_-") or "run"
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def checkpoint_points(cfg: DictConfig):
    """The checkpoints to evaluate as ``(points, models)``: ``Point``s (model name, series, x, run, step) and the
    ``models.<name>`` entries to add (``{run: <checkpoint folder>}``). Only files are looked at: no model loads."""
    from alignment.evaluation.curves import Point
    from alignment.training.checkpointing import saved_weight_steps

    x = cfg.get("x") or "step"
    if not isinstance(x, str):
        raise ConfigError(f"x must be step or a config key such as dataset.fraction, got {x!r}")
    folders = _runs(cfg)
    steps = _steps(cfg.get("steps"), x)
    labels = _labels(folders)
    fixed = [str(name) for name in (cfg.get("models") or {})]
    points, models = [], {}
    for i, (folder, label) in enumerate(zip(folders, labels)):
        key = "run" if len(folders) == 1 and cfg.get("run") not in (None, "") else f"runs[{i}]"
        saved = saved_weight_steps(folder)
        if steps == FINAL:
            chosen = {_final_step(folder): folder}
            if not any((folder / part).exists() for part in ("lora", "unet", "conditioner")):
                raise ConfigError(f"{key}: {folder} has no final export (lora/, unet/ or conditioner/: written when "
                                  f"training ends); pick saved checkpoints with steps=all or steps=[...]")
        else:
            if not saved:
                raise ConfigError(f"{key}: {folder} has no saved checkpoints (checkpoints/step_NNNNNN/: train with "
                                  f"checkpoint.weights_every_n_steps=N; steps=final evaluates the final export)")
            if steps == "all":
                chosen = saved
            else:
                missing = [s for s in steps if s not in saved]
                if missing:
                    raise ConfigError(f"steps: step {missing[0]} is not saved in {folder} (saved: "
                                      f"{', '.join(map(str, saved))})")
                chosen = {s: saved[s] for s in steps}
        x_value = None if x == "step" else _x_value(folder, x, key)
        for step, path in chosen.items():
            stem = FINAL if steps == FINAL else f"step_{step:06d}"
            name = stem if len(folders) == 1 else f"{label}-{stem}"
            if name in fixed:
                raise ConfigError(f"models.{name}: the name is taken by a checkpoint of {folder}; rename that model")
            if x == "step":
                if step is None:
                    raise ConfigError(f"{key}: {folder} has no summary.json giving its final step; use steps=all "
                                      f"or steps=[...] against step")
                x_point, series = float(step), label
            else:
                x_point, series = x_value, (FINAL if steps == FINAL else f"step {step}")
            points.append(Point(model=name, series=series, x=x_point, run=str(folder), step=step))
            models[name] = {"run": str(path)}
    return points, models, x


def evaluate_checkpoints(cfg: DictConfig) -> dict:
    from alignment.evaluate import evaluate
    from alignment.evaluation.curves import write_curves

    points, models, x = checkpoint_points(cfg)
    curves = cfg.get("curves") or {}
    wanted = curves.get("metrics")
    if isinstance(wanted, str):
        wanted = [wanted]
    wanted = [str(w) for w in wanted] if wanted else None
    fixed = [str(name) for name in (cfg.get("models") or {})]
    cfg = cfg.copy()
    with open_dict(cfg):
        if cfg.get("models") is None:
            cfg.models = {}
        for name, entry in models.items():
            cfg.models[name] = entry
    print(f"checkpoints: {len(points)} model(s) ({', '.join(p.model for p in points)}) against {x}; fixed: "
          f"{', '.join(fixed) or 'none'}")
    written = {}

    def extend(plan, evaluation, metrics):
        result = write_curves(points, metrics, fixed, x, plan.output_dir, wanted)
        written.update(names=result["names"])
        return result

    summary = evaluate(cfg, extend=extend)
    out = Path(summary["output_dir"])
    print(f"curves: {len(written.get('names', []))} metric(s) over {len(points)} checkpoint(s); "
          f"{out / 'curves.csv'}, {out / 'curves'}")
    return {**summary, "curves": str(out / "curves.json"), "curves_csv": str(out / "curves.csv"),
            "plots": str(out / "curves"), "points": [p.model for p in points]}


@entry_point("evaluate_checkpoints")
def main(cfg: DictConfig):
    return evaluate_checkpoints(cfg)


if __name__ == "__main__":
    main()
