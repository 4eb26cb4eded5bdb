"""Summarise a Hydra sweep of ``python -m alignment.run -m ...``: one row per job, the keys the jobs differ in, and
the mean of every logged scalar over each job's last N steps, read from each job's ``metrics.jsonl``, ``config.yaml``
and ``.hydra/overrides.yaml``.

    python -m alignment.run -m method=balanced_dpo method.beta=1000,5000 method.ref_update_every=50,100
    python experiments/summarize_sweep.py multirun/balanced_dpo-tiny/<date>            # a table on stdout
    python experiments/summarize_sweep.py multirun/balanced_dpo-tiny/<date> --last 20 --markdown   # or --csv
    python experiments/summarize_sweep.py multirun/balanced_dpo-tiny/<date> --keys method.beta method.optimizer.lr

Jobs: the sub-folders of the sweep folder holding a ``metrics.jsonl``, a ``config.yaml`` or ``.hydra/`` (Hydra's
``<sweep dir>/<job num>_<overrides>/``; a folder of several sweeps, one level deeper, works too), ordered by Hydra's
job number. A job without ``metrics.jsonl`` (failed, or still starting) is listed with empty values. A job folder
named by Hydra's default ``<num>_<overrides>`` is shown as its number (the overrides are columns).

Columns: ``job``, ``steps`` (the last logged step), then the config keys, then the metrics.
- Keys: ``--keys a.b c.d`` shows exactly these (looked up in each job's ``config.yaml``). By default: the keys whose
  values differ across jobs — from each job's ``.hydra/overrides.yaml`` (the command line; a group choice such as
  ``method=sft`` shows its option) when every job has one, else from a diff of the jobs' ``config.yaml`` (paths inside
  the job folder left out) — then ``method.beta`` and ``method.optimizer.lr`` when the configs have them.
- Metrics: the mean over the last ``--last`` logged steps (default 10) of every scalar in ``metrics.jsonl`` (every
  ``train/*`` value the run logged; ``step`` and ``time`` excepted): ``loss``, ``implicit_acc``, ``reward_margin``,
  ``policy_err_w``, ``policy_err_l`` first when present, then the rest alphabetically; ``--metrics`` picks some.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_COLUMNS = ("loss", "implicit_acc", "reward_margin", "policy_err_w", "policy_err_l")
ALWAYS_KEYS = ("method.beta", "method.optimizer.lr")  # shown by default when the configs have them
NOT_METRICS = ("step", "time")
JOB_FILES = ("metrics.jsonl", "config.yaml", ".hydra/overrides.yaml", ".hydra/config.yaml")
DEFAULT_SUBDIR = re.compile(r"^(\d+)_(.*=.*)?$")  # Hydra's ${hydra.job.num}_${hydra.job.override_dirname}
MISSING = object()


def lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_value(text: str):
    """An override's value as a number when it is one (``1000`` -> 1000, ``1e-5`` -> 1e-05), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text, text)


def override_items(lines) -> dict[str, str]:
    """``["method.beta=1000", "+x.y=2", "~z"]`` -> ``{"method.beta": "1000", "x.y": "2", "z": "(deleted)"}``."""
    out = {}
    for line in lines or []:
        line = str(line)
        key, sep, value = line.partition("=")
        key = key.lstrip("+~")
        out[key] = value if sep else "(deleted)"
    return out


def flatten(node, prefix: str = "") -> dict:
    """A nested config as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node} if prefix else {}


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class Job:
    folder: Path
    name: str
    num: int | None
    config: dict
    overrides: dict[str, str] | None
    records: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path, sweep_dir: Path) -> "Job":
        config = _read_yaml(folder / "config.yaml") or _read_yaml(folder / ".hydra" / "config.yaml") or {}
        overrides = _read_yaml(folder / ".hydra" / "overrides.yaml")
        hydra = _read_yaml(folder / ".hydra" / "hydra.yaml") or {}
        num = lookup(hydra, "hydra.job.num")
        match = DEFAULT_SUBDIR.match(folder.name)
        if not isinstance(num, int) and match:
            num = int(match.group(1))
        name = folder.name
        if match and isinstance(num, int) and int(match.group(1)) == num:
            name = str(num)  # Hydra's default <num>_<overrides> folder: the overrides are columns
        if folder.parent != sweep_dir:  # a folder of several sweeps: <sweep>/<job>
            name = f"{folder.parent.relative_to(sweep_dir)}/{name}"
        records = []
        metrics_file = folder / "metrics.jsonl"
        if metrics_file.is_file():
            for line in metrics_file.read_text().splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line being written as we read
        return cls(folder=folder, name=name, num=num if isinstance(num, int) else None,
                   config=config if isinstance(config, dict) else {},
                   overrides=override_items(overrides) if isinstance(overrides, list) else None, records=records)

    def value(self, key: str):
        """``key``'s value: the config's (a scalar), else the override's text (a group choice), else the config's."""
        value = lookup(self.config, key)
        if isinstance(value, (dict, list)) or value is None:
            if self.overrides is not None and key in self.overrides:
                return parse_value(self.overrides[key])
            if isinstance(value, list):
                return json.dumps(value)
            if isinstance(value, dict):
                return "{...}"
        return value


def find_jobs(sweep_dir: Path) -> list[Job]:
    """The job folders of a sweep (or, when it has none, of the sweeps one level below), in job order."""
    def children(root: Path) -> list[Path]:
        return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                and any((p / f).is_file() for f in JOB_FILES)]

    folders = children(sweep_dir)
    if not folders:
        folders = [job for sub in sorted(sweep_dir.iterdir()) if sub.is_dir() and not sub.name.startswith(".")
                   for job in children(sub)]
    jobs = [Job.read(folder, sweep_dir) for folder in folders]
    return sorted(jobs, key=lambda j: (str(j.folder.parent), j.num is None, j.num or 0, j.folder.name))


def differing_keys(jobs: list[Job]) -> list[str]:
    """The keys whose values differ across jobs: from the overrides when every job has them, else config diffs."""
    if len(jobs) < 2:
        return []
    if all(job.overrides is not None for job in jobs):
        keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
        return [key for key in keys if len({job.overrides.get(key, MISSING) if key in job.overrides else MISSING
                                            for job in jobs}) > 1]
    flat = [flatten(job.config) for job in jobs]
    keys = list(dict.fromkeys(key for f in flat for key in f))
    out, seen = [], {}
    for key in keys:
        values = [f.get(key, MISSING) for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < 2:
            continue
        # paths inside each job's own folder (output_dir, logger.save_dir ...) differ in every sweep
        if any(isinstance(v, str) and (str(job.folder) in v or v.endswith(job.folder.name))
               for v, job in zip(values, jobs)):
            continue
        signature = (key.rsplit(".", 1)[-1], json.dumps(values, sort_keys=True, default=str))
        if signature in seen:  # method.objective.beta = ${method.beta}: shown once, under the shorter key
            continue
        seen[signature] = key
        out.append(key)
    return out


def metric_columns(jobs: list[Job], chosen: list[str] | None = None) -> list[str]:
    present = dict.fromkeys(k for job in jobs for r in job.records for k, v in r.items()
                            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool))
    if chosen:
        return list(chosen)
    first = [c for c in DEFAULT_COLUMNS if c in present]
    return first + sorted(c for c in present if c not in first)


def summarize(sweep_dir: Path, keys: list[str] | None = None, last: int = 10,
              metrics: list[str] | None = None) -> list[dict]:
    """One row per job: ``job``, ``steps``, the keys (None: the differing ones, see the module docstring), then the
    mean of each metric over the last ``last`` logged steps (None where a job logged none)."""
    jobs = find_jobs(Path(sweep_dir))
    if keys is None:
        keys = differing_keys(jobs)
        keys += [k for k in ALWAYS_KEYS if k not in keys and any(lookup(j.config, k) is not None for j in jobs)]
    columns = metric_columns(jobs, metrics)
    rows = []
    for job in jobs:
        tail = job.records[-last:] if last > 0 else job.records
        row = {"job": job.name, "steps": job.records[-1].get("step") if job.records else None}
        row.update({key: job.value(key) for key in keys})
        for column in columns:
            values = [float(r[column]) for r in tail if isinstance(r.get(column), (int, float))]
            row[column] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no jobs with metrics.jsonl found)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no jobs with metrics.jsonl found)"
    columns = list(rows[0])
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(escape(cell(r[c])) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue().rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--keys", nargs="*", default=None,
                        help="config keys to show (default: the keys that differ across jobs, then method.beta and "
                             "method.optimizer.lr)")
    parser.add_argument("--last", type=int, default=10, help="average the last N logged steps (0: all)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="metrics.jsonl keys to show (default: every logged scalar)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="write CSV (full precision)")
    output.add_argument("--markdown", action="store_true", help="write a Markdown table")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    if args.last < 0:
        print(f"error: --last must be >= 0, got {args.last}", file=sys.stderr)
        return 2
    rows = summarize(args.sweep_dir, args.keys, args.last, args.metrics)
    print(format_csv(rows) if args.csv else format_markdown(rows) if args.markdown else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
