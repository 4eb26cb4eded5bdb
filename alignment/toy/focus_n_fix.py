"""Focus-N-Fix's claims on the toy world (``experiment=toy_draft`` / ``experiment=toy_focus_n_fix``): reward
fine-tuning through the sampler raises a safety reward, and the regional constraint keeps the fix inside the problem
region instead of repainting the whole image.

Trains two LoRAs on the 56 training captions, reward ``toy_safety`` (minus the pixels of blood and uncovered body),
K = 2 of 10 DDIM steps at CFG 1, 200 steps:

- ``draft``: DRaFT-2, the unconstrained control;
- ``fnf``:   Focus-N-Fix, the same plus β ‖(1 − M) ⊙ (Î₀ − Î)‖_F with M = toy_safety's heatmap mask of the reference;

then evaluates both against the base on the 28 held-out captions with the same seeds (``python -m
alignment.evaluate``: DDIM 10, CFG 1, ``images_per_prompt`` seeds from ``--data-seed``), with problem masks made from
the base model's images by toy_safety's heatmap (``metrics.change.mask=heatmap:toy_safety``). Returns each model's
Δ toy_safety against the base (paired, 95 % bootstrap interval over prompts: Table 1's Δreward) and PSNR / SSIM to
the base image overall and outside the mask (Table 2). Usage::

    python -m alignment.toy.focus_n_fix --out /tmp/fnf --seed 0                  # both runs, evaluation seeds 0-7
    python -m alignment.toy.focus_n_fix --out /tmp/fnf --seed 1 --data-seed 100  # evaluation seeds 100-107
    python -m alignment.toy.focus_n_fix --out /tmp/fnf --seed 2 --only fnf method.beta=0.3
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from alignment.toy.demo import driver_main, run_step, run_steps

REWARD = "toy_safety"
EVAL_SCORERS = (REWARD, "toy_artifacts", "toy_preference")
RUNS = {"draft": "toy_draft", "fnf": "toy_focus_n_fix"}     # run name -> experiment
CHANGE_KEYS = ("psnr", "psnr_outside", "ssim", "ssim_outside")


def run_all(out: Path, seed: int = 0, data_seed: int = 0, only: Sequence[str] | None = None,
            train_overrides: Sequence[str] = (), images_per_prompt: int = 8, logger: str = "none",
            parallel: int = 2) -> dict:
    """Train the runs (``only``: a subset of ``RUNS``), evaluate them against the base on held-out captions with
    image seeds ``data_seed`` … ``data_seed + images_per_prompt − 1``, return the summary (also written to
    ``<out>/summary.json``). A run folder holding ``summary.json`` (a finished run) is reused."""
    from alignment import package_file

    out.mkdir(parents=True, exist_ok=True)
    names = list(only or RUNS)
    start = time.time()
    # the trainings are independent: two at a time, one thread each (alignment.toy.demo.run_steps)
    run_steps([(["alignment.run", f"experiment={RUNS[name]}", f"seed={seed}", f"logger={logger}",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={out / name}", *train_overrides],
                out / f"{name}.log") for name in names if not (out / name / "summary.json").exists()],
              parallel=parallel)
    seconds = {"train": round(time.time() - start, 1)}
    eval_dir = out / "evaluate"
    start = time.time()
    run_step(["alignment.evaluate", "backbone=toy", f"scorers=[{','.join(EVAL_SCORERS)}]",
              f"prompts={package_file('toy/captions/heldout.txt')}", *[f"+models.{n}.run={out / n}" for n in names],
              f"images_per_prompt={images_per_prompt}", f"seed={data_seed}", "num_inference_steps=10",
              "guidance_scale=1.0", f"metrics.change.mask=heatmap:{REWARD}", f"logger={logger}",
              f"hydra.run.dir={eval_dir}"], out / "evaluate.log")
    seconds["evaluate"] = round(time.time() - start, 1)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    masks = sorted((eval_dir / "masks").glob("0*.png"))
    summary = {
        "seed": seed, "data_seed": data_seed, "images_per_prompt": images_per_prompt,
        "delta": {n: {s: metrics["reward_delta"]["models"][n][s] for s in EVAL_SCORERS} for n in names},
        "change": {n: {k: metrics["change"]["models"][n].get(k) for k in CHANGE_KEYS} for n in names},
        "mean": {m: {s: v["mean"] for s, v in metrics["mean_scores"][m].items()} for m in ["base", *names]},
        "masks": {"images": len(masks), "non_empty": _non_empty(masks)},
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _non_empty(paths: list[Path]) -> int:
    import numpy as np
    from PIL import Image

    return sum(int(np.asarray(Image.open(p)).max() > 0) for p in paths)


def format_summary(summary: dict) -> str:
    def delta(cell):
        return f"{cell['value']:+8.2f} [{cell['low']:+.2f}, {cell['high']:+.2f}]"

    lines = [f"seed {summary['seed']}, held-out image seeds from {summary['data_seed']} "
             f"({summary['images_per_prompt']} per caption): change against the base, 95 % interval over prompts; "
             f"masks: {summary['masks']['non_empty']} of {summary['masks']['images']} base images have a problem "
             f"region"]
    lines.append(f"{'model':<7}" + "".join(f"{'Δ ' + s:>28}" for s in EVAL_SCORERS)
                 + "".join(f"{k:>14}" for k in CHANGE_KEYS))
    for name, cells in summary["delta"].items():
        change = summary["change"][name]
        lines.append(f"{name:<7}" + "".join(f"{delta(cells[s]):>28}" for s in EVAL_SCORERS)
                     + "".join(f"{change[k]:>14.3f}" if change[k] is not None else f"{'-':>14}"
                               for k in CHANGE_KEYS))
    lines.append("means: " + "; ".join(f"{m}: " + ", ".join(f"{s} {v:.3f}" for s, v in means.items())
                                        for m, means in summary["mean"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return driver_main(argv, __doc__.splitlines()[0], RUNS, run_all, format_summary,
                       data_help="first held-out image seed of the evaluation", override_example="method.beta=0.3")


if __name__ == "__main__":
    main()
