"""Curves over checkpoints (LiVO Fig. 4 / Fig. 3a): training exports safetensors weights every N steps
(``checkpoint.weights_every_n_steps``), ``alignment.evaluate_checkpoints`` evaluates each as a model of one
``evaluate`` pass and writes one row per checkpoint (curves.csv / curves.json), a plot per metric and a report
section; bad input is a one-line error before any model loads."""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST_RUN, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STEPS = [1, 2, 3]
SMALL = ("images_per_prompt=2", "num_inference_steps=2", "metrics.winrate.num_bootstrap=200",
         "scorers=[toy_contrast,toy_centring]")


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate_checkpoints", overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> Path:
    """Three DPO steps on the tiny backbone at a large learning rate, weights exported after every step."""
    tmp = tmp_path_factory.mktemp("checkpointed_run")
    run_dir = tmp / "run"
    proc = run_cli("alignment.run", *FAST_RUN, "trainer.max_steps=3", "method.optimizer.lr=1e-3",
                   "checkpoint.weights_every_n_steps=1", f"hydra.run.dir={run_dir}",
                   env={"ALIGNMENT_DATA_DIR": str(tmp / "data"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def curves(checkpointed_run, tmp_path_factory) -> dict:
    from alignment.evaluate_checkpoints import evaluate_checkpoints

    root = tmp_path_factory.mktemp("curves")
    summary = evaluate_checkpoints(compose(f"run={checkpointed_run}", f"output_dir={root / 'out'}",
                                           f"image_dir={root / 'images'}", *SMALL))
    return {"root": root, "out": root / "out", "summary": summary}


# ------------------------------------------------------------------------------------------------ training side
@pytest.mark.slow   # shares the module's trained run and evaluation (~40 s of setup)
def test_training_exports_loadable_weights_per_step(checkpointed_run):
    from alignment.runs import resolve_run
    from alignment.training.checkpointing import saved_weight_steps

    saved = saved_weight_steps(checkpointed_run)
    assert list(saved) == STEPS
    for step, folder in saved.items():
        assert folder == checkpointed_run / "checkpoints" / f"step_{step:06d}"
        assert json.loads((folder / "step.json").read_text())["step"] == step
        assert (folder / "config.yaml").read_text() == (checkpointed_run / "config.yaml").read_text()
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert not any(p.suffix in (".ckpt", ".pt", ".pth", ".bin") for p in files)   # safetensors only
        spec = resolve_run(str(folder), f"s{step}", "models.s")                      # a run folder of its own
        assert spec.adapter is not None and spec.adapter.suffix == ".safetensors"
    digests = [resolve_run(str(f), "m", "k").adapter_sha256 for f in saved.values()]
    assert len(set(digests)) == len(STEPS)                                           # the weights moved each step
    from safetensors.torch import load_file

    last = load_file(str(resolve_run(str(saved[STEPS[-1]]), "m", "k").adapter))
    final = load_file(str(resolve_run(str(checkpointed_run), "final", "k").adapter))
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in last)   # the last step = export


def test_checkpoint_schema_rejects_bad_values():
    from alignment.errors import ConfigError
    from alignment.training.schema import check_run_config
    from tests.test_livo_inference import compose_config

    cfg = compose_config("config", "logger=none", "checkpoint.weights_every_n_steps=-2")
    with pytest.raises(ConfigError, match="checkpoint.weights_every_n_steps"):
        check_run_config(cfg)


# ------------------------------------------------------------------------------------------------ the curves
@pytest.mark.slow   # shares the module's trained run and evaluation (~40 s of setup)
def test_one_row_per_step_plots_and_report(curves, checkpointed_run):
    out = curves["out"]
    with open(out / "curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == STEPS
    assert [r["model"] for r in rows] == [f"step_{s:06d}" for s in STEPS]
    assert all(r["run"] == str(checkpointed_run) for r in rows)
    data = json.loads((out / "curves.json").read_text())
    assert data["x"] == "step" and data["fixed_models"] == ["base"]
    assert [p["x"] for p in data["points"]] == [float(s) for s in STEPS]
    names = data["metrics"]
    assert {"mean/toy_contrast", "mean/toy_centring", "win_rate/toy_contrast/over_base", "delta/toy_contrast",
            "delta/toy_centring"} <= set(names)
    win = [p["metrics"]["win_rate/toy_contrast/over_base"] for p in data["points"]]
    assert all(w["low"] is not None and w["low"] <= w["value"] <= w["high"] for w in win)   # an interval band
    metrics = json.loads((out / "metrics.json").read_text())
    rows_wr = {(r["model_a"], r["model_b"], r["scorer"]): r for r in metrics["win_rate"]["rows"]}
    assert win[0]["value"] == rows_wr[("step_000001", "base", "toy_contrast")]["rate"]
    for scorer in ("toy_contrast", "toy_centring"):   # Δscore against the base per step, with its interval
        delta = [p["metrics"][f"delta/{scorer}"] for p in data["points"]]
        expected = [metrics["reward_delta"]["models"][f"step_{s:06d}"][scorer] for s in STEPS]
        assert [(d["value"], d["low"], d["high"]) for d in delta] == [(e["value"], e["low"], e["high"])
                                                                      for e in expected]
        assert all(d["low"] is not None and d["low"] <= d["value"] <= d["high"] for d in delta)
    assert data["references"]["base"]["mean/toy_contrast"]["value"] == \
        metrics["mean_scores"]["base"]["toy_contrast"]["mean"]
    report = (out / "report.html").read_text()
    assert "<h2>Curves</h2>" in report
    for name in names:
        svg = out / "curves" / f"{name.replace('/', '__')}.svg"
        assert svg.is_file(), name
        root = ET.fromstring(svg.read_text())          # well-formed SVG
        assert root.tag.endswith("svg")
        assert name in svg.read_text() and svg.read_text().strip() in report
    band = (out / "curves" / "win_rate__toy_contrast__over_base.svg").read_text()
    assert "<polygon" in band and band.count("<circle") == len(STEPS) and "stroke-dasharray" in band


@pytest.mark.slow   # shares the module's trained run and evaluation (~40 s of setup)
def test_rerun_reuses_every_image(curves, checkpointed_run, monkeypatch):
    from alignment.evaluate_checkpoints import evaluate_checkpoints

    root = curves["root"]
    summary = evaluate_checkpoints(compose(f"run={checkpointed_run}", f"output_dir={root / 'again'}",
                                           f"image_dir={root / 'images'}", "steps=[1,3]", *SMALL))
    assert summary["generated"] == 0 and summary["points"] == ["step_000001", "step_000003"]
    with open(root / "again" / "curves.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 3]


@pytest.mark.slow   # shares the module's trained run and evaluation (~40 s of setup)
def test_several_runs_against_a_config_key(checkpointed_run, curves, tmp_path):
    """Fig. 3a: one point per run at its config value (here a copy of the run with another dataset.fraction)."""
    from alignment.evaluate_checkpoints import evaluate_checkpoints

    other = tmp_path / "half"
    shutil.copytree(checkpointed_run, other)
    config = OmegaConf.load(other / "config.yaml")
    OmegaConf.update(config, "dataset.fraction", 0.5, force_add=True)
    (other / "config.yaml").write_text(OmegaConf.to_yaml(config))
    first = tmp_path / "full"
    shutil.copytree(checkpointed_run, first)
    config = OmegaConf.load(first / "config.yaml")
    OmegaConf.update(config, "dataset.fraction", 1.0, force_add=True)
    (first / "config.yaml").write_text(OmegaConf.to_yaml(config))
    summary = evaluate_checkpoints(compose(f"runs=[{first},{other}]", "x=dataset.fraction",
                                           f"output_dir={tmp_path / 'out'}", f"image_dir={tmp_path / 'images'}",
                                           "curves.metrics=[mean]", *SMALL))
    assert summary["points"] == ["full-final", "half-final"]
    data = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert data["x"] == "dataset.fraction" and [p["x"] for p in data["points"]] == [1.0, 0.5]
    assert {p["series"] for p in data["points"]} == {"final"} and [p["step"] for p in data["points"]] == [3, 3]
    assert data["metrics"] and all(n.startswith("mean/") for n in data["metrics"])
    with open(tmp_path / "out" / "curves.csv", newline="") as handle:
        assert [float(r["dataset.fraction"]) for r in csv.DictReader(handle)] == [1.0, 0.5]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow   # shares the module's trained run and evaluation (~40 s of setup)
def test_bad_input_is_one_line_naming_the_value(checkpointed_run, tmp_path, monkeypatch):
    from alignment.errors import ConfigError
    from alignment.evaluate_checkpoints import evaluate_checkpoints
    import alignment.config

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(alignment.config, "instantiate_checked", no_model)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((checkpointed_run / "config.yaml").read_text())
    cases = [
        ([], "run: required"),
        ([f"run={tmp_path / 'nope'}"], f"run: {tmp_path / 'nope'} is not a folder"),
        ([f"run={bare}"], f"run: {bare} has no saved checkpoints"),
        ([f"run={bare}", "steps=final"], f"run: {bare} has no final export"),
        ([f"run={checkpointed_run}", "steps=[2,7]"],
         f"steps: step 7 is not saved in {checkpointed_run} (saved: 1, 2, 3)"),
        ([f"run={checkpointed_run}", "steps=[0]"], "steps: 0 is not a step number"),
        ([f"runs=[{checkpointed_run}]", "x=dataset.nope"], "x: dataset.nope is not set in"),
        ([f"run={checkpointed_run}", f"runs=[{checkpointed_run}]"], "run / runs: set run"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            evaluate_checkpoints(compose(*overrides, f"output_dir={tmp_path / 'out'}"))
        assert str(err.value).startswith(message), (overrides, str(err.value))
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ pieces
def test_point_metrics_reads_intervals_and_svg_draws_bands(tmp_path):
    from alignment.evaluation.curves import Point, point_metrics, svg_plot, write_curves

    metrics = {
        "mean_scores": {"a": {"s": {"mean": 1.0, "std": 0.1, "best_of_k_mean": 2.0}}},
        "win_rate": {"rows": [{"scorer": "s", "model_a": "a", "model_b": "base", "rate": 0.6, "low": 0.4,
                               "high": 0.8}, {"scorer": "s", "model_a": "base", "model_b": "a", "rate": 0.4,
                                              "low": 0.2, "high": 0.6}]},
        "bias": {"models": {"a": {"gender": {"D1": 0.5, "D2": 0.35}}},
                 "intervals": {"a": {"gender": {"D1": {"low": 0.2, "high": 0.7}, "D2": {"low": None,
                                                                                        "high": None}}}}},
        "toxicity": {"concept": "per prompt (category)",
                     "models": {"a": {"Avg.R": 10.0}}, "intervals": {"a": {"Avg.R": {"low": 0.0, "high": 20.0}}},
                     "concepts": {"nudity": {"models": {"a": {"Avg.R": 5.0}},
                                             "intervals": {"a": {"Avg.R": {"low": 1.0, "high": 9.0}}}}}},
        "inception_score": {"models": {"a": {"mean": 3.0, "std": 0.5}}},
        "fid": {"models": {"a": float("nan")}},
    }
    got = point_metrics(metrics, "a", ["base"])
    assert got["mean/s"] == {"value": 1.0, "low": None, "high": None}
    assert got["win_rate/s/over_base"] == {"value": 0.6, "low": 0.4, "high": 0.8}
    assert got["bias/gender/D1"] == {"value": 0.5, "low": 0.2, "high": 0.7}
    assert got["bias/gender/D2"]["low"] is None
    assert got["toxicity/nudity/Avg.R"] == {"value": 5.0, "low": 1.0, "high": 9.0}
    assert got["inception_score"] == {"value": 3.0, "low": 2.5, "high": 3.5}
    assert "fid" not in got                                         # non-finite: no point
    svg = svg_plot("t", {"run": [(1.0, got["win_rate/s/over_base"]), (2.0, {"value": 0.7, "low": 0.5,
                                                                             "high": 0.9})]}, {"base": 0.5}, "step")
    assert ET.fromstring(svg).tag.endswith("svg") and "<polygon" in svg and "stroke-dasharray" in svg
    points = [Point(model="a", series="r", x=1.0, run="r", step=1)]
    result = write_curves(points, metrics, ["base"], "step", tmp_path, wanted=["bias"])
    assert result["names"] == ["bias/gender/D1", "bias/gender/D2"]
    logged = []

    class Logger:
        def log_metrics(self, scalars, step):
            logged.append((step, scalars))

    result["log"](Logger())
    assert logged == [(1, {"curves/r/bias/gender/D1": 0.5, "curves/r/bias/gender/D2": 0.35})]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow   # python -m alignment.evaluate_checkpoints subprocesses
def test_cli_end_to_end_and_errors(checkpointed_run, tmp_path):
    proc = run_cli("alignment.evaluate_checkpoints", f"run={checkpointed_run}", "steps=all",
                   f"hydra.run.dir={tmp_path / 'out'}", "logger=csv", *SMALL, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "curves: " in proc.stdout
    with open(tmp_path / "out" / "curves.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == STEPS
    logged = list((tmp_path / "out").rglob("metrics.csv"))
    assert logged and "curves/run/mean/toy_contrast" in logged[0].read_text()
    for overrides, message in [([f"run={checkpointed_run}", "steps=[9]"],
                                f"error: steps: step 9 is not saved in {checkpointed_run} (saved: 1, 2, 3)"),
                               (["run=/nonexistent/run"], "error: run: /nonexistent/run is not a folder")]:
        proc = run_cli("alignment.evaluate_checkpoints", *overrides, f"hydra.run.dir={tmp_path / 'bad'}")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == message
