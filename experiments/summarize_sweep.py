"""Summarise a Hydra sweep of ``python -m alignment.run -m ...``: one row per job, last-N-step means of the logged
DPO scalars, read from each job's ``metrics.jsonl`` and ``config.yaml``.

    python -m alignment.run -m method.beta=1000,2000,5000 trainer.max_steps=200
    python experiments/summarize_sweep.py multirun/dpo-tiny/<date>  [--last 20] [--keys method.beta method.optimizer.lr]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DEFAULT_COLUMNS = ("loss", "implicit_acc", "reward_margin", "policy_err_w", "policy_err_l")


def lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def summarize(sweep_dir: Path, keys: list[str], last: int) -> list[dict]:
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.jsonl")):
        job = metrics_file.parent
        config = yaml.safe_load((job / "config.yaml").read_text()) if (job / "config.yaml").exists() else {}
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if not records:
            continue
        tail = records[-last:]
        row = {"job": job.name, "steps": records[-1]["step"]}
        row.update({k: lookup(config, k) for k in keys})
        for column in DEFAULT_COLUMNS:
            values = [r[column] for r in tail if column in r]
            row[column] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no jobs with metrics.jsonl found)"
    columns = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--keys", nargs="*", default=["method.beta", "method.optimizer.lr"])
    parser.add_argument("--last", type=int, default=10, help="average the last N logged steps")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    print(format_table(summarize(args.sweep_dir, args.keys, args.last)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
