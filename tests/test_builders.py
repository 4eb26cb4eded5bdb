"""Dataset builders (alignment.builders, python -m alignment.build): a killed build resumes to the same file, N
processes (shards, torchrun) write the file one process writes, the key follows settings and weights, DDP ranks wait
for rank 0, the CLI end to end with one-line errors, and toy pairs identical to the code before builders.

Run as a module, this file is the worker the subprocess tests start: ``python -m tests.test_builders OUT [--delay S]
[--shard I N]`` builds :class:`CountingBuilder` into OUT and prints the result as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from alignment.builders.base import Builder
from alignment.builders.runner import build, build_table, ensure_built, output_path, shard_from_env
from alignment.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
PRE_BUILDER_COMMIT = "02847314b3c5a267783357f1a115eaca112bb528"  # the last commit before the builders
COUNTING_SCHEMA = pa.schema([pa.field("item", pa.int64()), pa.field("value", pa.float64()),
                             pa.field("batch_mean", pa.float64())])


class CountingBuilder(Builder):
    """Cheap rows: item i's value comes from a generator seeded by (seed, i); ``batch_mean`` is the mean over the
    item's chunk, so it changes if chunks were composed differently. ``finalize`` sorts by value and adds each row's
    share of the total (a dataset-wide statistic). ``crash_after`` raises after that many chunks (a killed build);
    ``delay`` sleeps per chunk (time to kill a subprocess)."""

    name = "counting"
    item_unit = "row"
    chunk_size = 4
    schema = COUNTING_SCHEMA

    def __init__(self, num: int = 22, seed: int = 0, crash_after: int | None = None, delay: float = 0.0,
                 needs_backbone: bool = False, scorer_names: tuple[str, ...] = ()):
        self.num, self.seed, self.crash_after, self.delay = num, seed, crash_after, delay
        self.needs_backbone, self.scorer_names = needs_backbone, scorer_names
        self.calls: list[list[int]] = []

    def num_items(self) -> int:
        return self.num

    def key_fields(self) -> dict:
        return {"version": 1, "num": self.num, "seed": self.seed}

    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls.append(list(items))
        time.sleep(self.delay)
        values = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(self.seed * 100_003 + i))
                              for i in items]).sum(1).double()
        return pa.table({"item": list(items), "value": values.tolist(),
                         "batch_mean": [float(values.mean())] * len(items)}, schema=COUNTING_SCHEMA)

    def finalize(self, table: pa.Table) -> pa.Table:
        table = table.take(pc.sort_indices(table, sort_keys=[("value", "descending")]))
        total = pc.sum(pc.abs(table.column("value"))).as_py()
        return table.append_column("share", pc.divide(table.column("value"), total))


def assert_every_item_once(table: pa.Table, num: int) -> None:
    items = table.column("item").to_pylist()
    assert sorted(items) == list(range(num))  # no row lost, none duplicated


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pa.Table:
    """The uninterrupted one-process build."""
    result = build(CountingBuilder(), tmp_path_factory.mktemp("reference"), shard=(0, 1), progress=False)
    assert result.complete and result.rows == 22 and result.chunks_built == 6
    return pq.read_table(result.path)


def test_a_killed_build_resumes_to_the_same_file(tmp_path, reference):
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(CountingBuilder(crash_after=3), tmp_path, shard=(0, 1), progress=False)
    parts = next(tmp_path.glob(".counting-*.parts"))
    assert sorted(p.name for p in parts.glob("chunk-*.parquet")) == [f"chunk-{c:06d}.parquet" for c in range(3)]
    assert not list(tmp_path.glob("counting-*.parquet"))  # no output before every chunk exists
    (parts / ".chunk-000003.parquet.123.abc.tmp").write_bytes(b"half a chunk")  # a write killed mid-way

    again = CountingBuilder()
    result = build(again, tmp_path, shard=(0, 1), progress=False)
    assert result.complete and result.chunks_built == 3
    assert again.calls == [list(range(12, 16)), list(range(16, 20)), [20, 21]]  # finished chunks were kept
    table = pq.read_table(result.path)
    assert table.equals(reference)
    assert_every_item_once(table, 22)
    assert not parts.exists()  # merged: the parts (and the stray temporary file) are gone
    info = json.loads(result.path.with_suffix(".json").read_text())
    assert info["rows"] == 22 and info["settings"] == {"version": 1, "num": 22, "seed": 0}
    # the file exists: another build is a no-op
    third = CountingBuilder()
    assert build(third, tmp_path, shard=(0, 1), progress=False).chunks_built == 0 and third.calls == []


def test_in_memory_table_and_shards_in_one_process(tmp_path, reference):
    assert build_table(CountingBuilder()).equals(reference)
    first = build(CountingBuilder(), tmp_path, shard=(1, 3), progress=False)  # chunks 1 and 4
    assert not first.complete and first.chunks_built == 2
    assert build(CountingBuilder(), tmp_path, shard=(0, 3), progress=False).complete is False
    last = build(CountingBuilder(), tmp_path, shard=(2, 3), progress=False)  # the last to finish merges
    assert last.complete and last.chunks_built == 2
    assert pq.read_table(last.path).equals(reference)


def test_shard_comes_from_config_then_slurm_then_rank():
    assert shard_from_env(env={}) == (0, 1)
    assert shard_from_env(2, 5, env={"RANK": "1", "WORLD_SIZE": "2"}) == (2, 5)
    assert shard_from_env(env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4",
             "RANK": "0", "WORLD_SIZE": "1"}
    assert shard_from_env(env=slurm) == (3, 4)
    assert shard_from_env(env={"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0",
                               "SLURM_ARRAY_TASK_MAX": "12", "SLURM_ARRAY_TASK_STEP": "4"}) == (2, 4)
    with pytest.raises(ConfigError, match="shard.index / shard.count: set both"):
        shard_from_env(1, None, env={})
    with pytest.raises(ConfigError, match=r"shard.index must be in \[0, shard.count\), got index 3 of count 3"):
        shard_from_env(3, 3, env={})


def test_key_follows_settings_and_weights(tmp_path):
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.fingerprint import backbone_fingerprint
    from alignment.toy.scorers import ToyColour, ToyContrast

    backbone = build_tiny_backbone()
    sampler = CountingBuilder(needs_backbone=True)
    base = output_path(sampler, tmp_path, backbone)
    assert base == output_path(CountingBuilder(needs_backbone=True), tmp_path, backbone)  # deterministic
    assert base.parent == tmp_path and base.name.startswith("counting-")
    assert output_path(CountingBuilder(seed=1, needs_backbone=True), tmp_path, backbone) != base
    assert output_path(sampler, tmp_path, backbone, chunk_size=5) != base
    encoders = backbone_fingerprint(backbone)  # the latent cache's: VAE and text encoder only
    seen = {base}
    for part in ("unet", "vae", "text_encoder"):
        weight = next(getattr(backbone, part).parameters())
        with torch.no_grad():
            weight.add_(0.01)
        changed = output_path(sampler, tmp_path, backbone)
        assert changed not in seen, part
        seen.add(changed)
        if part == "unet":
            assert backbone_fingerprint(backbone) == encoders  # latent cache keys ignore the UNet
    assert backbone_fingerprint(backbone)["weights"] != encoders["weights"]
    backbone.vae.eval()  # the VAE decodes a few ulps differently in eval mode: another file
    assert output_path(sampler, tmp_path, backbone) not in seen
    # a builder that does not sample does not depend on the backbone
    assert output_path(CountingBuilder(), tmp_path, backbone) == output_path(CountingBuilder(), tmp_path, None)
    with pytest.raises(ConfigError, match="needs a backbone"):
        output_path(sampler, tmp_path, None)
    # the scorers the builder uses are in the key; other scorers are not
    judged = CountingBuilder(scorer_names=("judge",))
    with_colour = output_path(judged, tmp_path, None, {"judge": ToyColour(), "other": ToyContrast()})
    assert with_colour == output_path(judged, tmp_path, None, {"judge": ToyColour()})
    assert with_colour != output_path(judged, tmp_path, None, {"judge": ToyContrast()})
    with pytest.raises(ConfigError, match="scorers: builder 'counting' needs scorer 'judge'"):
        output_path(judged, tmp_path, None, {})
    # a stale file is never reused: another setting builds its own file beside the first
    first = build(CountingBuilder(), tmp_path, shard=(0, 1), progress=False).path
    second = build(CountingBuilder(seed=3), tmp_path, shard=(0, 1), progress=False).path
    assert first != second and first.exists()
    assert not pq.read_table(first).equals(pq.read_table(second))


def test_ensure_built_other_ranks_wait_for_rank_0(tmp_path, monkeypatch, capsys, reference):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DataError, match="not built after 0 s of waiting"):
        ensure_built(CountingBuilder(), tmp_path, poll_seconds=0.01, timeout=0.2)

    rank0 = CountingBuilder(delay=0.1)
    thread = threading.Timer(0.3, lambda: ensure_built(rank0, tmp_path, rank=0, progress=False))
    thread.start()
    waiter = CountingBuilder()
    path = ensure_built(waiter, tmp_path, poll_seconds=0.02)  # RANK=1 from the environment
    thread.join()
    assert path.exists() and waiter.calls == [] and len(rank0.calls) == 6
    assert pq.read_table(path).equals(reference)
    assert "rank 1: waiting for rank 0 to build" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    again = CountingBuilder()
    assert ensure_built(again, tmp_path) == path and again.calls == []  # built: a no-op for rank 0 too


def test_ensure_built_resumes_a_crashed_build(tmp_path, reference):
    with pytest.raises(RuntimeError):
        ensure_built(CountingBuilder(crash_after=2), tmp_path, progress=False)
    again = CountingBuilder()
    path = ensure_built(again, tmp_path, progress=False)
    assert len(again.calls) == 4 and pq.read_table(path).equals(reference)


def test_cli_names_a_missing_or_unknown_builder_and_key(capsys):
    from alignment import build as cli

    for argv, message in (([], "error: builder: name the dataset to build: python -m alignment.build NAME "
                                "[overrides] (available in conf/builder/: hg_dpo, livo, pair_scores, pools, "
                                "synthetic, toy_pairs)"),
                          (["--cfg", "job"], "error: builder: name the dataset to build"),
                          (["nope"], "error: builder: unknown builder config 'nope' (available in conf/builder/: "
                                     "hg_dpo, livo, pair_scores, pools, synthetic, toy_pairs)"),
                          (["toy_pairs", "builder.pairs_per_captio=3"],
                           "error: builder.pairs_per_captio: not a key of the config")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    assert cli.translate_argv(["toy_pairs", "-m", "shard.index=0,1", "--cfg", "job"]) == \
        ["-m", "--cfg", "job", "builder=toy_pairs", "shard.index=0,1"]


# ------------------------------------------------------------------------------------------- subprocesses
def worker_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_builders", str(out), *args]


def worker_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.mark.slow
def test_a_sigkilled_process_resumes_to_the_same_file(tmp_path, reference):
    proc = subprocess.Popen(worker_command(tmp_path, "--delay", "0.5"), cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob(".counting-*.parts/chunk-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kept = len(list(tmp_path.glob(".counting-*.parts/chunk-*.parquet")))
    assert 2 <= kept < 6 and not list(tmp_path.glob("counting-*.parquet"))
    rerun = subprocess.run(worker_command(tmp_path), cwd=REPO, env=worker_env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["complete"] and result["chunks_built"] == 6 - kept
    table = pq.read_table(result["path"])
    assert table.equals(reference)
    assert_every_item_once(table, 22)


@pytest.mark.slow
def test_two_processes_write_the_file_one_process_writes(tmp_path, reference):
    """Two shard processes at once (shard 0/1 of 2), then torchrun with 2 processes (RANK / WORLD_SIZE): the last
    to finish merges, and the file equals the one-process file, floats included."""
    procs = [subprocess.Popen(worker_command(tmp_path / "shards", "--shard", str(i), "2"), cwd=REPO,
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["chunks_built"] for r in results) == [3, 3]
    assert any(r["complete"] for r in results)
    sharded = Path(results[0]["path"])
    assert pq.read_table(sharded).equals(reference)
    assert not list((tmp_path / "shards").glob(".counting-*.parts"))

    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*launcher, "--nproc-per-node=2", "--master-port=0", "-m", "tests.test_builders",
                           str(tmp_path / "torchrun")], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["shard"] for r in lines) == [[0, 2], [1, 2]]
    assert sorted(r["chunks_built"] for r in lines) == [3, 3]
    assert pq.read_table(lines[0]["path"]).equals(reference)
    assert Path(lines[0]["path"]).name == sharded.name  # same key, same file name


@pytest.mark.slow
def test_cli_builds_toy_pairs_end_to_end(tmp_path):
    from alignment.toy.backbone import build_toy_backbone
    from alignment.toy.pairs import ToyPairsBuilder
    from tests.conftest import run_cli

    args = ("toy_pairs", "backbone=toy", "builder.pairs_per_caption=1", "builder.num_inference_steps=2",
            f"out={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}")
    proc = run_cli("alignment.build", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: ") and last.endswith(" (56 rows)")
    path = Path(last[len("done: "):-len(" (56 rows)")])
    assert path.parent == tmp_path / "out" and path.name.startswith("pairs-") and path.exists()
    assert "pair/s" in proc.stderr  # the progress bar counts pairs
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["rows"] == 56 and info["captions"] == 56 and info["settings"]["pairs_per_caption"] == 1
    expected = build_table(ToyPairsBuilder(pairs_per_caption=1, num_inference_steps=2), build_toy_backbone())
    assert pq.read_table(path).equals(expected)
    again = run_cli("alignment.build", *args)
    assert again.returncode == 0 and "nothing to build" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == last

    bad = run_cli("alignment.build", "toy_pairs", "+builder.pairs_per_captio=3", f"out={tmp_path / 'bad'}",
                  f"hydra.run.dir={tmp_path / 'hydra2'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: builder.pairs_per_captio: unknown key for "
                                                          "alignment.toy.pairs.ToyPairsBuilder")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_toy_pairs_builder_equals_the_code_before_builders(tmp_path):
    """Rows of the pre-builder ``build_toy_pair_table`` (loaded from git) for 168 pairs: two chunks per guidance
    scale, the second one partial — the same sampling batches, so the same bytes."""
    from alignment.toy import pairs as P
    from alignment.toy.backbone import build_toy_backbone

    source = subprocess.run(["git", "show", f"{PRE_BUILDER_COMMIT}:alignment/toy/pairs.py"], cwd=REPO,
                            capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"the pre-builder commit is not in this checkout: {source.stderr.strip()}")
    file = tmp_path / "old_pairs.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("old_toy_pairs", file)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    backbone = build_toy_backbone()
    before = old.build_toy_pair_table(backbone, P.captions_for("train"), pairs_per_caption=3, num_inference_steps=2)
    builder = P.ToyPairsBuilder(pairs_per_caption=3, num_inference_steps=2)
    assert [len(r) for r in builder.chunk_ranges(builder.chunk_size)] == [64, 20, 64, 20]
    path = ensure_built(builder, tmp_path / "out", backbone, {}, progress=False)
    after = pq.read_table(path)
    assert after.num_rows == 168 and after.schema.equals(before.schema)
    for column in before.column_names:
        assert after.column(column).equals(before.column(column)), column


# ------------------------------------------------------------------------------------------- worker
def worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--shard", type=int, nargs=2, default=None)
    args = parser.parse_args(argv)
    shard = tuple(args.shard) if args.shard else shard_from_env()
    result = build(CountingBuilder(delay=args.delay), args.out, shard=shard, progress=False)
    print(json.dumps({"path": str(result.path), "complete": result.complete, "chunks_built": result.chunks_built,
                      "shard": list(shard)}), flush=True)


if __name__ == "__main__":
    worker()
