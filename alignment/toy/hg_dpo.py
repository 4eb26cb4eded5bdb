"""HG-DPO's claims on the toy world (``experiment=toy_hg_dpo``): pools of the base model's own samples ranked by the
toy rater (``toy_preference``, PickScore's role) make a better model with bigger pools, and the statistic-matching
loss and LAN take back the colour shift that DPO on such pairs brings.

Trains on the 56 training captions (each twice: 112 pools), LoRA, 300 steps:

- ``n2``:        N = 2 images per pool, Diffusion-DPO alone (λ_stat = 0) — the paper's N-2 row;
- ``n20``:       N = 20, Diffusion-DPO alone — the paper's N-20 row;
- ``n20_stat``:  N = 20, Diffusion-DPO + λ_stat · L_stat — HG-DPO;

then evaluates them, and ``n20_stat`` sampled with LAN against the base model (``n20_stat_lan``), with the base on the
28 held-out captions with the same seeds (``python -m alignment.evaluate``: DDIM 20, CFG 3, mean over
``images_per_prompt`` seeds per prompt, 95 % bootstrap interval over prompts) and returns each model's win rate over
the base and its HSV colour shift against the base (Table 2's measure, with a bootstrap interval over prompts).
Usage::

    python -m alignment.toy.hg_dpo --out /tmp/hg --seed 0                 # one training seed, all runs
    python -m alignment.toy.hg_dpo --out /tmp/hg --seed 1 --data-seed 100000 --only n20 n20_stat
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from alignment.toy.demo import cell_text, driver_main, run_step, write_heldout_prompts

EVAL_SCORERS = ("toy_preference", "toy_colour", "toy_artifacts", "toy_safety")
RUNS = {"n2": ["dataset.generate.num_images=2", "method.lambda_stat=0"],
        "n20": ["method.lambda_stat=0"],
        "n20_stat": []}
LAN_OF = {"n20_stat_lan": "n20_stat"}      # evaluated models sampled with LAN: name -> the run they sample


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
            run_step(["alignment.run", "experiment=toy_hg_dpo", f"seed={seed}",
                      f"dataset.generate.seed={data_seed}", f"dataset.source={out / 'pools'}", f"logger={logger}",
                      "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *RUNS[name],
                      *train_overrides], out / f"{name}.log")
        seconds[name] = round(time.time() - start, 1)
    lan_models = {lan: run for lan, run in LAN_OF.items() if run in names}
    prompts = out / "heldout_prompts.txt"
    write_heldout_prompts(prompts)
    eval_dir = out / "evaluate"
    start = time.time()
    models = [f"+models.{name}.run={out / name}" for name in names]
    for lan, run in lan_models.items():
        models += [f"+models.{lan}.run={out / run}", f"+models.{lan}.lan=true"]
    run_step(["alignment.evaluate", "backbone=toy", f"scorers=[{','.join(EVAL_SCORERS)}]", f"prompts={prompts}",
              *models, f"images_per_prompt={images_per_prompt}", "guidance_scale=3.0", "num_inference_steps=20",
              "metrics.winrate.reduce=mean", f"logger={logger}", f"hydra.run.dir={eval_dir}"], out / "evaluate.log")
    seconds["evaluate"] = round(time.time() - start, 1)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    rows = {(r["model_a"], r["model_b"], r["scorer"]): r for r in metrics["win_rate"]["rows"]}
    evaluated = [*names, *lan_models]
    shift = metrics["color_shift"]
    summary = {
        "seed": seed, "data_seed": data_seed, "images_per_prompt": images_per_prompt,
        "win_rate": {name: {s: {k: rows[(name, "base", s)][k] for k in ("rate", "low", "high", "wins", "ties",
                                                                          "losses")}
                            for s in EVAL_SCORERS} for name in evaluated},
        "color_shift": {name: shift["shift_percent"][name] for name in evaluated},
        "color_shift_signed": {name: shift["signed_percent"][name] for name in evaluated},
        "hsv_means": shift["hsv_means"],
        "mean": {m: {s: v["mean"] for s, v in metrics["mean_scores"][m].items()} for m in ["base", *evaluated]},
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def total_shift(shift: dict) -> float:
    """|ΔH| + |ΔS| + |ΔV| in percent: one number for 'how far the colours moved'."""
    return sum(abs(v) for v in shift.values())


def format_summary(summary: dict) -> str:
    lines = [f"seed {summary['seed']}, data seed {summary['data_seed']}: win rate over the base on the 28 held-out "
             f"captions (mean of {summary['images_per_prompt']} seeds per prompt), 95 % interval; HSV shift vs base"]
    lines.append(f"{'model':<14}" + "".join(f"{s:>26}" for s in EVAL_SCORERS) + "   shift H / S / V (sum) %")
    for name, cells in summary["win_rate"].items():
        shift = summary["color_shift"][name]
        lines.append(f"{name:<14}" + "".join(
            f"{cell_text(c)}  "
            for c in (cells[s] for s in EVAL_SCORERS))
            + f"   {shift['H']:.2f} / {shift['S']:.2f} / {shift['V']:.2f} ({total_shift(shift):.2f})")
    lines.append("means: " + "; ".join(f"{m}: " + ", ".join(f"{s} {v:.3f}" for s, v in means.items())
                                        for m, means in summary["mean"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return driver_main(argv, __doc__.splitlines()[0], RUNS, run_all, format_summary,
                       data_help="pool sampling seed (other pools)", override_example="method.lambda_stat=1000")


if __name__ == "__main__":
    main()
