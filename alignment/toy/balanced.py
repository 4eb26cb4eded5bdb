"""BalancedDPO's claim on the toy world: the ensemble's vote improves most quality scorers at once, while DPO on one
scorer's labels improves that scorer and gives ground on another.

Trains, on the same pairs (the demo's pairs of the base model's own samples, ``experiment=toy_balanced_dpo``):

- ``vote``: BalancedDPO, labels = majority vote of the four toy quality scorers (colour, shape, centring,
  contrast), reference refreshed every 100 steps;
- ``single_<scorer>``: the same component with ``method.label_rule=single method.scorer=<scorer>`` for each scorer
  (the paper's single-scorer rows of Table 3);

then evaluates every model and the base on the 28 held-out captions with the same seeds
(``python -m alignment.evaluate``, mean over ``images_per_prompt`` seeds per prompt, 95 % bootstrap interval) and
returns every model's win rate over the base on every scorer. Usage::

    python -m alignment.toy.balanced --out /tmp/balanced --seed 0          # one training seed, all runs
    python -m alignment.toy.balanced --out /tmp/balanced --seed 1 --data-seed 100000 --only vote single_toy_colour
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from alignment.toy.demo import cell_text, driver_main, run_step, write_heldout_prompts

QUALITY = ("toy_colour", "toy_shape", "toy_centring", "toy_contrast")
EVAL_SCORERS = QUALITY + ("toy_preference", "toy_artifacts", "toy_safety")
RUNS = {"vote": [], **{f"single_{name}": ["method.label_rule=single", f"method.scorer={name}"] for name in QUALITY}}


def run_all(out: Path, seed: int = 0, data_seed: int = 0, only: Sequence[str] | None = None,
            train_overrides: Sequence[str] = (), images_per_prompt: int = 8, logger: str = "none") -> dict:
    """Train the runs (``only``: a subset of ``RUNS``), evaluate them against the base, return the summary (also
    written to ``<out>/summary.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(only or RUNS)
    seconds = {}
    for name in names:
        start = time.time()
        run_dir = out / name
        if not (run_dir / "summary.json").exists():  # resumable by hand: a finished run is kept
            run_step(["alignment.run", "experiment=toy_balanced_dpo", f"seed={seed}",
                      f"dataset.generate.seed={data_seed}", f"logger={logger}", "trainer.enable_progress_bar=false",
                      f"hydra.run.dir={run_dir}", *RUNS[name], *train_overrides], out / f"{name}.log")
        seconds[name] = round(time.time() - start, 1)
    prompts = out / "heldout_prompts.txt"
    write_heldout_prompts(prompts)
    eval_dir = out / "evaluate"
    start = time.time()
    run_step(["alignment.evaluate", "backbone=toy", f"scorers=[{','.join(EVAL_SCORERS)}]", f"prompts={prompts}",
              *[f"+models.{name}.adapter={out / name}" for name in names],
              f"images_per_prompt={images_per_prompt}", "guidance_scale=3.0", "num_inference_steps=20",
              "metrics.winrate.reduce=mean", f"logger={logger}", f"hydra.run.dir={eval_dir}"], out / "evaluate.log")
    seconds["evaluate"] = round(time.time() - start, 1)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    rows = {(r["model_a"], r["model_b"], r["scorer"]): r for r in metrics["win_rate"]["rows"]}
    summary = {
        "seed": seed, "data_seed": data_seed, "images_per_prompt": images_per_prompt,
        "win_rate": {name: {s: {k: rows[(name, "base", s)][k] for k in ("rate", "low", "high", "wins", "ties",
                                                                          "losses")}
                            for s in EVAL_SCORERS} for name in names},
        "mean": {m: {s: v["mean"] for s, v in metrics["mean_scores"][m].items()} for m in ["base", *names]},
        "labels": {name: json.loads((out / name / "labels.json").read_text()) for name in names},
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"seed {summary['seed']}, data seed {summary['data_seed']}: win rate over the base on the 28 held-out "
             f"captions (mean of {summary['images_per_prompt']} seeds per prompt), 95 % interval"]
    header = f"{'model':<20}" + "".join(f"{s:>26}" for s in EVAL_SCORERS)
    lines.append(header)
    for name, cells in summary["win_rate"].items():
        lines.append(f"{name:<20}" + "".join(
            f"{cell_text(c)}  "
            for c in (cells[s] for s in EVAL_SCORERS)))
    lines.append("means: " + "; ".join(f"{m}: " + ", ".join(f"{s} {v:.3f}" for s, v in means.items())
                                        for m, means in summary["mean"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return driver_main(argv, __doc__.splitlines()[0], RUNS, run_all, format_summary,
                       data_help="pair sampling seed (other pairs)", override_example="method.ref_update_every=50")


if __name__ == "__main__":
    main()
