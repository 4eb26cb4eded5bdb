"""Sweeps: every job of a Hydra multirun logs its own W&B run, grouped by the sweep and tagged with its overrides
(read from Hydra's runtime config in ``alignment.loggers``), and ``experiments/summarize_sweep.py`` tabulates the
jobs. The W&B runs are offline; their run record is read back from the ``.wandb`` file."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.cli import CONF_DIR
from tests.conftest import REPO, run_cli

SUMMARIZE = REPO / "experiments" / "summarize_sweep.py"


def compose(*overrides: str, hydra: bool = False):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def hydra_job():
    """Make the process look like a Hydra job: ``hydra_job(mode, sweep_dir, overrides, num)`` sets HydraConfig (as
    Hydra does while a job runs); the previous state is put back afterwards."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    previous = HydraConfig.instance().cfg

    def set_job(multirun: bool, sweep_dir: str = "multirun/dpo-tiny/2025-01-01_12-00-00",
                overrides: tuple[str, ...] = ("method.beta=1000",), num: int = 0):
        cfg = compose(*overrides, hydra=True)
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        cfg.hydra.sweep.dir = sweep_dir
        cfg.hydra.job.num = num
        cfg.hydra.job.name = "run"
        HydraConfig.instance().set_config(cfg)

    yield set_job
    HydraConfig.instance().cfg = previous


def wandb_settings(tmp_path, *overrides: str):
    """The wandb.init arguments of the logger ``build_logger`` makes (no W&B run is started)."""
    from alignment.loggers import build_logger

    logger = build_logger(compose("logger=wandb", f"output_dir={tmp_path}", *overrides), tmp_path)
    assert type(logger).__name__ == "WandbLogger"
    return logger._wandb_init


# ------------------------------------------------------------------------------------------------ the logger
def test_single_run_and_no_hydra_have_no_group(tmp_path, hydra_job):
    outside = wandb_settings(tmp_path)  # a logger built outside Hydra (tests, scripts)
    assert outside.get("group") is None and outside.get("tags") is None and outside.get("job_type") is None
    assert outside["name"] == "dpo-tiny"
    hydra_job(multirun=False)
    single = wandb_settings(tmp_path)
    assert single.get("group") is None and single.get("tags") is None and single["name"] == "dpo-tiny"


def test_multirun_job_settings(tmp_path, hydra_job):
    long_override = "paths.data_dir=/data/" + "x" * 80
    hydra_job(multirun=True, overrides=("method.beta=1000", long_override), num=3)
    settings = wandb_settings(tmp_path)
    assert settings["group"] == "dpo-tiny/2025-01-01_12-00-00"
    assert settings["tags"][0] == "method.beta=1000"
    assert len(settings["tags"]) == 2 and len(settings["tags"][1]) == 64  # W&B refuses tags over 64 characters
    assert settings["tags"][1].startswith("paths.data_dir=/data/xxx") and settings["tags"][1].endswith("...")
    assert settings["job_type"] == "train" and settings["name"] == "dpo-tiny-job3"
    # values set in the config win (group, job_type); configured tags are kept, the overrides added
    mine = wandb_settings(tmp_path, "logger.group=mine", "logger.job_type=ablation", "logger.tags=[a]")
    assert mine["group"] == "mine" and mine["job_type"] == "ablation"
    assert mine["tags"] == ["a", "method.beta=1000", settings["tags"][1]]


# ------------------------------------------------------------------------------------------------ end to end
def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``: LevelDB log format, 32 KiB blocks of chunks with a
    7-byte header: CRC32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) as ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def run_record(job_dir: Path):
    runs = list((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return next(r.run for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "run")


@pytest.mark.slow
def test_multirun_groups_tags_and_summary(tmp_path, data_dir):
    sweep_dir = tmp_path / "multirun" / "dpo-tiny" / "sweep1"
    proc = run_cli("alignment.run", "-m", "method.beta=1000,2000", "logger=wandb", "samples.every_n_steps=0",
                   "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    runs = [run_record(job) for job in jobs]
    assert runs[0].run_id != runs[1].run_id  # each job its own run (not the first job's run reused)
    for num, (job, run, beta) in enumerate(zip(jobs, runs, (1000, 2000))):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert run.run_group == "dpo-tiny/sweep1"
        assert list(run.tags) == overrides and f"method.beta={beta}" in run.tags
        assert run.job_type == "train" and run.display_name == f"dpo-tiny-job{num}"

    table = subprocess.run([sys.executable, str(SUMMARIZE), str(sweep_dir)], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    header = table[0].split()
    assert header[:3] == ["job", "steps", "method.beta"] and header.index("loss") < header.index("implicit_acc")
    assert header.index("implicit_acc") < header.index("reward_margin") and "ref_err_w" in header
    assert [line.split()[:3] for line in table[1:]] == [["0", "2", "1000"], ["1", "2", "2000"]]

    out = subprocess.run([sys.executable, str(SUMMARIZE), str(sweep_dir), "--csv", "--last", "1"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    for job, row in zip(jobs, rows):
        last = json.loads((job / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["loss"]) == pytest.approx(last["loss"], rel=1e-12)
        assert float(row["reward_margin"]) == pytest.approx(last["reward_margin"], abs=1e-12)


# ------------------------------------------------------------------------------------------------ summarize_sweep
def write_job(folder: Path, config: dict, records: list[dict] | None, overrides: list[str] | None = None,
              num: int | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if records is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overrides is not None or num is not None:
        (folder / ".hydra").mkdir()
        if overrides is not None:
            (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if num is not None:
            (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))


def summarize(*args: str) -> str:
    sys.path.insert(0, str(SUMMARIZE.parent))
    try:
        import summarize_sweep
    finally:
        sys.path.remove(str(SUMMARIZE.parent))
    buffer = io.StringIO()
    stdout, sys.stdout = sys.stdout, buffer
    try:
        assert summarize_sweep.main(list(args)) == 0
    finally:
        sys.stdout = stdout
    return buffer.getvalue()


def records(losses, **extra) -> list[dict]:
    return [{"step": i + 1, "time": 0.0, "loss": loss, **{k: v[i] for k, v in extra.items()}}
            for i, loss in enumerate(losses)]


def test_summarize_sweep_keys_metrics_and_formats(tmp_path):
    sweep = tmp_path / "sweep"
    base = {"method": {"name": "balanced_dpo", "beta": 1000, "ref_update_every": 100,
                       "objective": {"beta": 1000}, "optimizer": {"lr": 1e-5}},
            "output_dir": None, "seed": 0}

    def config(beta, every, job):
        method = {**base["method"], "beta": beta, "ref_update_every": every, "objective": {"beta": beta}}
        return {**base, "method": method, "output_dir": str(sweep / job)}

    # Hydra's default folder names; job 10 sorts after job 2 (by number, not by name)
    write_job(sweep / "2_method.beta=2000,method.ref_update_every=null", config(2000, None, "2"),
              records([0.7, 0.5, 0.3], implicit_acc=[0.5, 0.75, 1.0], zeta=[1, 2, 3]),
              ["method.beta=2000", "method.ref_update_every=null", "trainer.max_steps=3"], num=2)
    write_job(sweep / "10_method.beta=1000,method.ref_update_every=100", config(1000, 100, "10"),
              records([0.69, 0.6]), ["method.beta=1000", "method.ref_update_every=100", "trainer.max_steps=3"],
              num=10)
    write_job(sweep / "11_method.beta=1000,method.ref_update_every=50", config(1000, 50, "11"), None,
              ["method.beta=1000", "method.ref_update_every=50", "trainer.max_steps=3"], num=11)  # no metrics yet

    lines = summarize(str(sweep), "--last", "2").splitlines()
    assert lines[0].split() == ["job", "steps", "method.beta", "method.ref_update_every", "method.optimizer.lr",
                                "loss", "implicit_acc", "zeta"]
    assert lines[1].split() == ["2", "3", "2000", "-", "1e-05", "0.4", "0.875", "2.5"]
    assert lines[2].split() == ["10", "2", "1000", "100", "1e-05", "0.645", "-", "-"]
    assert lines[3].split() == ["11", "-", "1000", "50", "1e-05", "-", "-", "-"]

    rows = list(csv.DictReader(io.StringIO(summarize(str(sweep), "--csv", "--last", "0", "--metrics", "loss"))))
    assert list(rows[0]) == ["job", "steps", "method.beta", "method.ref_update_every", "method.optimizer.lr",
                             "loss"]
    assert float(rows[0]["loss"]) == pytest.approx(0.5) and rows[2]["loss"] == "" and rows[2]["steps"] == ""
    markdown = summarize(str(sweep), "--markdown", "--keys", "method.beta").splitlines()
    assert markdown[0].startswith("| job | steps | method.beta | loss |") and markdown[1].startswith("|---|")
    assert markdown[2].startswith("| 2 | 3 | 2000 |")

    # without .hydra/overrides.yaml: the config keys that differ (not the job's own output_dir; method.objective.beta
    # = method.beta shown once)
    plain = tmp_path / "plain"
    write_job(plain / "a", config(1000, 100, "a"), records([0.1]))
    write_job(plain / "b", config(2000, 100, "b"), records([0.2]))
    lines = summarize(str(plain)).splitlines()
    assert lines[0].split() == ["job", "steps", "method.beta", "method.optimizer.lr", "loss"]
    assert [line.split()[:3] for line in lines[1:]] == [["a", "1", "1000"], ["b", "1", "2000"]]
