"""Bad input gets a one-line error naming the key, file or row, before any training starts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from alignment.data.synthetic import make_synthetic_pairs
from alignment.errors import AlignmentError
from alignment.cli import CONF_DIR
from alignment.run import train
from tests.conftest import FAST_RUN, run_cli


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*FAST_RUN, "trainer.max_steps=1",
                                                        f"output_dir={tmp_path / 'run'}", *overrides])


def train_error(tmp_path, *overrides) -> str:
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(AlignmentError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written
    return message


@pytest.fixture()
def parquet_without_label(tmp_path):
    table = pq.read_table(make_synthetic_pairs(tmp_path / "good.parquet", num_rows=4))
    path = tmp_path / "no_label.parquet"
    pq.write_table(table.drop(["label_0"]), path)
    return path


def test_negative_beta(tmp_path, data_dir):
    assert train_error(tmp_path, "method.beta=-1") == "method.beta must be > 0, got -1"


def test_missing_dataset_path(tmp_path):
    message = train_error(tmp_path, "dataset.source=/no/such/pairs.parquet", "dataset.generate=null")
    assert "dataset.source" in message and "/no/such/pairs.parquet" in message


def test_parquet_without_required_columns(tmp_path, parquet_without_label):
    message = train_error(tmp_path, f"dataset.source={parquet_without_label}", "dataset.generate=null")
    assert str(parquet_without_label) in message and "'label_0'" in message


def test_unreadable_image_fails_naming_the_row(tmp_path):
    bad = make_synthetic_pairs(tmp_path / "bad.parquet", num_rows=8, num_corrupt=1)
    labels = pq.read_table(bad).column("jpg_1").to_pylist()
    corrupt_row = next(i for i, b in enumerate(labels) if not b.startswith(b"\xff\xd8"))
    message = train_error(tmp_path, f"dataset.source={bad}", "dataset.generate=null", "dataset.bad_rows=fail")
    assert f"{bad} row {corrupt_row}: column jpg_1 is not a readable image" in message


def test_unknown_keys_inside_nodes(tmp_path, data_dir):
    assert train_error(tmp_path, "+trainer.max_stepz=3").startswith("trainer.max_stepz: unknown Trainer argument")
    assert train_error(tmp_path, "+method.objective.bta=3").startswith("method.objective.bta: unknown key")
    assert train_error(tmp_path, "+backbone.resolutoin=64").startswith("backbone.resolutoin: unknown key")


def test_bad_values(tmp_path, data_dir):
    assert "method.finetune" in train_error(tmp_path, "method.finetune=partial")
    assert "dataset.ties" in train_error(tmp_path, "dataset.ties=random")
    assert "trainer.max_steps must be a positive integer" in train_error(tmp_path, "trainer.max_steps=0")
    assert "dataset.batch_size must be a positive integer" in train_error(tmp_path, "dataset.batch_size=0")
    assert "resume: /no/such.ckpt is neither" in train_error(tmp_path, "resume=/no/such.ckpt")
    assert "method.lora.target_modules" in train_error(tmp_path, "method.lora.target_modules=[not_a_layer]")


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [
    (("method.bta=1",), "error: method.bta: not a key of the config"),   # checked before Hydra starts
    (("method=nope",), "error: method: unknown method config 'nope' (available in conf/method/: "
                       + ", ".join(sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("[!_]*.yaml"))) + ")"),
    (("method.beta=-5",), "error: method.beta must be > 0, got -5"),
    (("dataset.source=/no/such.parquet", "dataset.generate=null"), "error: dataset.source: /no/such.parquet"),
])
def test_cli_prints_one_line_without_traceback(tmp_path, data_dir, overrides, expected):
    proc = run_cli("alignment.run", *FAST_RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in proc.stderr.splitlines() if expected in line)]


def test_misspelt_key_in_a_sweep_is_one_line(tmp_path, data_dir):
    proc = run_cli("alignment.run", "-m", *FAST_RUN, "method.beta=1,2", "trainer.max_stepz=3",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.max_stepz: not a key of the config (a new key needs a '+': +trainer.max_stepz=...)"]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_bad_rows_skip_counts_and_trains(tmp_path):
    bad = make_synthetic_pairs(tmp_path / "bad.parquet", num_rows=8, num_corrupt=2)
    proc = run_cli("alignment.run", *FAST_RUN, f"dataset.source={bad}", "dataset.generate=null",
                   "dataset.bad_rows=skip", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dataset: skipped 2 bad row(s)" in proc.stderr


def test_empty_table_is_reported(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"jpg_0": pa.array([], pa.binary()), "jpg_1": pa.array([], pa.binary()),
                             "label_0": pa.array([], pa.float64()), "caption": pa.array([], pa.string())}), path)
    message = train_error(tmp_path, f"dataset.source={path}", "dataset.generate=null")
    assert message.startswith(f"dataset.source: {path}")


@pytest.mark.parametrize("overrides, expected", [
    (("backbone.resolution=48", "scorers=toy_colour", "dataset.generate.rank_by=toy_colour"),
     "scorers.toy_colour: scorer 'toy_colour' scores the toy world's 32 px images (or whole multiples of 32 px, "
     "area-pooled), not the backbone's 48 px samples"),
    (("scorers=toy_colour", "dataset.generate.rank_by=pickscore"),
     "scorers: dataset.generate.rank_by is 'pickscore', which is not a configured scorer (add it: "
     "scorers=[pickscore]; configured: toy_colour)"),
])
def test_pool_scorer_errors_come_before_any_model_loads(tmp_path, overrides, expected, monkeypatch):
    import alignment.config
    from alignment.builders.pools import PoolBuilder

    instantiate = alignment.config.instantiate_checked

    def no_backbone(node, key, *args, **kwargs):
        assert key != "backbone", "the backbone was built before the scorer checks"
        return instantiate(node, key, *args, **kwargs)

    monkeypatch.setattr(alignment.config, "instantiate_checked", no_backbone)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue circle\n")
    original = PoolBuilder.build_chunk
    PoolBuilder.build_chunk = lambda *args: pytest.fail("sampled before the scorer checks")
    try:
        message = train_error(tmp_path, "dataset=pools", f"dataset.generate.prompts={prompts}",
                              "dataset.generate.num_images=2", f"paths.data_dir={tmp_path / 'data'}", *overrides)
    finally:
        PoolBuilder.build_chunk = original
    assert message.startswith(expected)
    assert not list((tmp_path / "data").glob("pools/*pools-*"))   # no pool file, no chunk
