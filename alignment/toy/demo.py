"""`make demo`: Diffusion-DPO on the toy world, then the aligned model against the base on held-out captions.

Two commands, printed as they run so they can be re-typed with other settings:

1. ``python -m alignment.run experiment=toy_dpo`` — LoRA Diffusion-DPO on the pretrained toy backbone, with pairs
   of its own samples labelled by the world's rater (``toy_preference``; generated once, ~1 minute);
2. ``python -m alignment.evaluate backbone=toy scorers=[toy_preference,toy_quality,...] prompts=<held-out>
   +models.dpo.adapter=<run>`` — the same seeds for both models on the captions training never saw.

Then it prints the win rate of the aligned model over the base (per prompt: mean toy_preference over the same
``images_per_prompt`` seeds, ties half) with its 95 % bootstrap interval over prompts, the per-term means, and
where the report, metrics and W&B files are. Usage::

    python -m alignment.toy.demo                          # outputs/demo/<time>/{train,evaluate}
    python -m alignment.toy.demo --out /tmp/demo method.beta=5000 trainer.max_steps=600   # extra: training overrides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from alignment.errors import AlignmentError, TrainingError

JUDGE = "toy_preference"
EVAL_SCORERS = (JUDGE, "toy_colour", "toy_shape", "toy_centring", "toy_contrast", "toy_artifacts", "toy_safety")


def run_step(args: list[str], log: Path) -> None:
    """Run ``python -m <args>`` with its output going to ``log`` (and to the console when it fails)."""
    run_steps([(args, log)])


def run_steps(steps: list[tuple[list[str], Path]], parallel: int = 1) -> None:
    """Run ``python -m <args>`` for each ``(args, log)``, at most ``parallel`` at a time; each parallel process gets
    ``cpu_count // parallel`` threads (OMP_NUM_THREADS), so independent trainings share the cores instead of
    oversubscribing them. The first failure is raised (one line naming its log) after the others finish."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    pending, running, failure = list(steps), [], None
    while pending or running:
        while pending and len(running) < max(1, parallel):
            args, log = pending.pop(0)
            print("$ python -m " + " ".join(args), flush=True)
            handle = open(log, "w")
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT, env=env)
            running.append((proc, handle, args, log))
        proc, handle, args, log = running.pop(0)
        proc.wait()
        handle.close()
        if proc.returncode != 0 and failure is None:
            failure = (proc.returncode, args, log)
    if failure is not None:
        code, args, log = failure
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        if errors:  # our entry points end with one line naming the key, file or value
            raise TrainingError(f"{args[0]}: {errors[-1][len('error: '):]} (log: {log})")
        print("\n".join(lines[-15:]), file=sys.stderr)
        raise TrainingError(f"{args[0]} failed (exit {code}); full log in {log}")


def verdict(cell: dict) -> str:
    """A win-rate cell's verdict: '+' its interval is above 50 %, '-' below, '=' it holds 50 %."""
    return "+" if cell["low"] > 0.5 else "-" if cell["high"] < 0.5 else "="


def cell_text(cell: dict) -> str:
    """A win-rate cell for a table: rate [low, high] in percent and its verdict."""
    return f"{100 * cell['rate']:>8.1f} [{100 * cell['low']:5.1f},{100 * cell['high']:5.1f}] {verdict(cell)}"


def driver_main(argv, description: str, runs, run_all, format_summary, data_help: str, override_example: str,
                images_per_prompt: int = 8) -> dict:
    """The command line shared by the toy-world method drivers (``alignment.toy.balanced``, ``alignment.toy.hg_dpo``):
    ``--out``, ``--seed``, ``--data-seed``, ``--only`` (a subset of ``runs``), ``--images-per-prompt`` and training
    overrides; runs ``run_all`` and prints ``format_summary`` of its summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0, help="training seed (LoRA init, noise)")
    parser.add_argument("--data-seed", type=int, default=0, help=data_help)
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {', '.join(runs)}")
    parser.add_argument("--images-per-prompt", type=int, default=images_per_prompt)
    parser.add_argument("overrides", nargs="*", help=f"training overrides, e.g. {override_example}")
    args = parser.parse_args(argv)
    if args.only:  # overrides typed after --only land in it: key=value is an override, anything else a run name
        args.overrides += [o for o in args.only if "=" in o]
        args.only = [o for o in args.only if "=" not in o]
        unknown = [o for o in args.only if o not in runs]
        if unknown:
            parser.exit(2, f"error: --only: unknown run {unknown[0]!r} (runs: {', '.join(runs)})\n")
    try:
        summary = run_all(Path(args.out), args.seed, args.data_seed, args.only, args.overrides,
                          args.images_per_prompt)
    except AlignmentError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(format_summary(summary))
    return summary


def write_heldout_prompts(path: Path) -> list[str]:
    from alignment.toy.pairs import split_captions

    _, heldout = split_captions()
    path.write_text("\n".join(heldout) + "\n")
    return heldout


def summarise(eval_dir: Path, train_dir: Path, seconds: dict) -> dict:
    from alignment.metrics.winrate import win_rate

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    rows = {(r["model_a"], r["model_b"], r["scorer"]): r for r in metrics["win_rate"]["rows"]}
    means = metrics["mean_scores"]
    per_image = json.loads((eval_dir / "scores.json").read_text())
    scores = per_image["scores"]
    wr = metrics["win_rate"]
    # the best-of-k protocol (docs/evaluation.md#win-rate) on the same images, for comparison: best of the k images per
    # prompt
    best_of_k = win_rate(scores["dpo"][JUDGE], scores["base"][JUDGE], num_bootstrap=wr["num_bootstrap"],
                         seed=wr["seed"], confidence=wr["confidence"], reduce="best").as_dict()
    return {
        "win_rate": rows[("dpo", "base", JUDGE)],
        "win_rate_best_of_k": best_of_k,
        "per_scorer": {s: rows[("dpo", "base", s)] for s in EVAL_SCORERS if ("dpo", "base", s) in rows},
        "mean": {m: {s: v["mean"] for s, v in means[m].items()} for m in ("base", "dpo")},
        "num_prompts": len(per_image["prompts"]),
        "images_per_prompt": metrics["config"].get("images_per_prompt"),
        "train_dir": str(train_dir), "eval_dir": str(eval_dir),
        "report": str(eval_dir / "report.html"), "metrics": str(eval_dir / "metrics.json"),
        "wandb": sorted(str(p) for folder in (train_dir / "wandb", eval_dir / "wandb") if folder.exists()
                        for p in folder.glob("offline-run-*")),
        "seconds": seconds,
    }


def run_demo(out: Path, train_overrides: Sequence[str] = (), eval_overrides: Sequence[str] = (),
             images_per_prompt: int = 8, logger: str = "wandb") -> dict:
    """Train, evaluate, and return the summary (also written to ``<out>/summary.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    train_dir, eval_dir = out / "train", out / "evaluate"
    seconds = {}
    start = time.time()
    run_step(["alignment.run", "experiment=toy_dpo", f"logger={logger}", "trainer.enable_progress_bar=false",
              f"hydra.run.dir={train_dir}", *train_overrides], out / "train.log")
    seconds["train"] = round(time.time() - start, 1)
    prompts = out / "heldout_prompts.txt"
    write_heldout_prompts(prompts)
    start = time.time()
    run_step(["alignment.evaluate", "backbone=toy", f"scorers=[{','.join(EVAL_SCORERS)}]", f"prompts={prompts}",
              f"+models.dpo.adapter={train_dir}", f"images_per_prompt={images_per_prompt}", "guidance_scale=3.0",
              "num_inference_steps=20", "metrics.winrate.reduce=mean", f"logger={logger}",
              f"hydra.run.dir={eval_dir}", *eval_overrides], out / "evaluate.log")
    seconds["evaluate"] = round(time.time() - start, 1)
    summary = summarise(eval_dir, train_dir, seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    wr = summary["win_rate"]
    print()
    print(f"Toy-world Diffusion-DPO: aligned (LoRA) vs base on {summary['num_prompts']} held-out captions, "
          f"{summary['images_per_prompt']} seeds each (same seeds for both), CFG 3")
    print(f"  win rate of the aligned model over the base ({JUDGE}, mean over the seeds per prompt, ties half): "
          f"{100 * wr['rate']:.1f}%  95% CI [{100 * wr['low']:.1f}, {100 * wr['high']:.1f}]  "
          f"(W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']})")
    best = summary["win_rate_best_of_k"]
    print(f"  (the best-of-k protocol of docs/evaluation.md#win-rate, best of the "
          f"{summary['images_per_prompt']} images per prompt: {100 * best['rate']:.1f}% "
          f"[{100 * best['low']:.1f}, {100 * best['high']:.1f}]; the base's best image is often already near the "
          f"rater's ceiling here, DPO mostly removes its bad samples)")
    base, dpo = summary["mean"]["base"], summary["mean"]["dpo"]
    print("  mean scores, base -> aligned: " + ", ".join(f"{s} {base[s]:.3f} -> {dpo[s]:.3f}" for s in base))
    print(f"  time: training {summary['seconds']['train']:.0f} s (incl. pair generation on the first run), "
          f"evaluation {summary['seconds']['evaluate']:.0f} s")
    print(f"  report:  {summary['report']}")
    print(f"  metrics: {summary['metrics']}")
    print(f"  run:     {summary['train_dir']} (LoRA in lora/, per-step metrics in metrics.jsonl, samples/)")
    for run in summary["wandb"]:
        print(f"  W&B:     {run} (offline; `wandb sync <that folder>` uploads it)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default outputs/demo/<time>)")
    parser.add_argument("--images-per-prompt", type=int, default=8, help="seeds per held-out caption (default 8)")
    parser.add_argument("--logger", default="wandb", help="wandb (offline) | csv | none")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for training, e.g. method.beta=5000")
    args = parser.parse_args(argv)
    if args.images_per_prompt < 1:
        parser.exit(2, f"error: --images-per-prompt must be >= 1, got {args.images_per_prompt}\n")
    out = Path(args.out or f"outputs/demo/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    try:
        summary = run_demo(out, args.overrides, images_per_prompt=args.images_per_prompt, logger=args.logger)
    except AlignmentError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
