"""Building a builder's dataset file: keyed, chunked, resumable, sharded over processes, merged by the last finisher.

Files, for a builder named ``toy_pairs`` and an output folder ``out``::

    out/toy_pairs-<key>.parquet               the dataset; written last (atomically): its presence marks completion
    out/toy_pairs-<key>.json                  settings, model fingerprints and summary statistics
    out/.toy_pairs-<key>.parts/chunk-000042.parquet   rows of chunk 42, one file per chunk
    out/.toy_pairs-<key>.lock                 flock'ed while merging (and by ensure_built while building)

The key hashes the builder's ``key_fields()``, its name, item count and chunk size, the fingerprint of the backbone
(VAE, text encoders and UNet weights, tokenizer, schedulers; only for builders that use it) and of every scorer the
builder uses (class, weights, settings). Another setting or other weights give another file; a stale one is never
reused, and if the file for this key exists, building is a no-op.

Chunk ``c`` holds items ``[c·chunk_size, (c+1)·chunk_size)`` (or the builder's own ``chunk_ranges``, which may cut
at group borders). Every chunk is written atomically, so a killed build leaves whole chunks only: a restart keeps
and skips them (no row is lost or duplicated). Chunk ``c`` belongs to shard ``c % count``; each process builds its shard's missing chunks,
then takes the lock and, if every chunk exists and the output does not, concatenates them in order, applies the
builder's ``finalize``, writes the ``.json`` and then the ``.parquet``, and removes the parts folder. So with a
SLURM array or torchrun the last process to finish merges. Chunk contents do not depend on the shard count, so N
processes write the same file as one.

- :func:`build`: one shard (index/count from the arguments, else the environment: :func:`shard_from_env`).
- :func:`ensure_built`: training-time use — rank 0 (or a process without ``RANK``) builds everything under the lock;
  other ranks wait for the file. Returns its path.
- :func:`build_table`: the same rows in memory, no files (tests, small data).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from alignment.builders.base import Builder
from alignment.errors import ConfigError, DataError
from alignment.files import atomic_write, atomic_write_text
from alignment.fingerprint import MODEL_PARTS, backbone_fingerprint, scorer_fingerprint

FORMAT = 1  # bump when the file layout or the key's fields change
KEY_LENGTH = 16  # hex digits of the key in file names
CHUNK_PATTERN = "chunk-{:06d}.parquet"
POLL_SECONDS = 2.0
MESSAGE_SECONDS = 60.0


def _log(message: str) -> None:
    print(f"build: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- keys
def backbone_key_fields(backbone) -> dict[str, Any]:
    """What a sampled image depends on: class, weight dtype, resolution, the weights of the VAE, text encoder(s)
    and UNet with the tokenizer(s), which of them are in training mode (the VAE decodes a few ulps differently in
    train and eval mode, enough to flip 8-bit pixels), and the schedulers' configs. Not the name or the folder the
    weights came from: the same weights give the same key on every machine."""
    fingerprint = backbone_fingerprint(backbone, MODEL_PARTS)
    fields = {k: fingerprint[k] for k in ("class", "weight_dtype", "weights")}
    fields["train_mode"] = sorted(name for name, module in backbone.named_children()
                                  if name.startswith(MODEL_PARTS) and any(m.training for m in module.modules()))
    fields["resolution"] = getattr(backbone, "resolution", None)
    for name in ("noise_scheduler", "sample_scheduler"):
        scheduler = getattr(backbone, name, None)
        if scheduler is not None:
            config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
            fields[name] = {"class": type(scheduler).__name__, **config}
    return fields


def _check_json(settings: dict, name: str) -> None:
    try:
        json.dumps(settings, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"builder {name!r}: key_fields() must be JSON-serialisable ({err})") from err


@dataclass
class BuildPlan:
    """Where a build's files go and what its key covers (see :func:`plan_build`)."""

    builder: Builder
    name: str
    key: str
    fields: dict
    out: Path
    num_items: int
    chunk_size: int
    ranges: list[range] = field(repr=False)
    scorers: dict = field(repr=False)

    @property
    def output(self) -> Path:
        return self.out / f"{self.name}-{self.key}.parquet"

    @property
    def info(self) -> Path:
        return self.out / f"{self.name}-{self.key}.json"

    @property
    def parts(self) -> Path:
        return self.out / f".{self.name}-{self.key}.parts"

    @property
    def lock(self) -> Path:
        return self.out / f".{self.name}-{self.key}.lock"

    @property
    def num_chunks(self) -> int:
        return len(self.ranges)

    def items(self, chunk: int) -> range:
        return self.ranges[chunk]

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / CHUNK_PATTERN.format(chunk)


def _check_backbone(builder: Builder, backbone) -> None:
    if builder.needs_backbone and backbone is None:
        raise ConfigError(f"backbone: builder {builder.name!r} samples images and needs a backbone")


def check_scorer_config(builder: Builder, scorer_nodes: Mapping | None, resolution=None) -> None:
    """From the config alone, before any model loads (``python -m alignment.build``): the scorers the builder will
    read from the scorers mapping are configured — its own ``check_scorer_names(configured)`` if it has one (the pool
    builder names ``<key>.rank_by``), else every one of its ``scorer_names`` — and, given the backbone's
    ``resolution``, each of them can score images of that size (``Scorer.check_resolution``, asked of the class
    that ``_target_`` names; a target that does not import is left to the key checks)."""
    from alignment.scorers.base import scorer_class

    nodes = scorer_nodes or {}
    configured = [str(name) for name in nodes]
    check = getattr(builder, "check_scorer_names", None)
    if check is not None:
        check(configured)
    else:
        missing = [name for name in builder.scorer_names if name not in configured]
        if missing:
            raise ConfigError(f"scorers: builder {builder.name!r} needs scorer {missing[0]!r} "
                              f"(add it: scorers=[{','.join(builder.scorer_names)}])")
    if resolution is None:
        return
    for name in builder.scorer_names:
        target = scorer_class(nodes.get(name)) if name in configured else None
        check_resolution = getattr(target, "check_resolution", None)
        if callable(check_resolution):
            check_resolution(resolution, f"scorers.{name}")


def _check_resolution(builder: Builder, backbone, selected: Mapping) -> None:
    """Before any image is sampled: every scorer the builder uses can score the backbone's samples."""
    resolution = getattr(backbone, "resolution", None) if builder.needs_backbone else None
    if resolution is None:
        return
    for name, scorer in selected.items():
        check = getattr(scorer, "check_resolution", None)
        if callable(check):
            check(resolution, f"scorers.{name}")


def _chunk_size(builder: Builder, chunk_size) -> int:
    from alignment.config import positive_int

    return positive_int(builder.chunk_size if chunk_size is None else chunk_size, "chunk_size")


def _num_items(builder: Builder) -> int:
    count = int(builder.num_items())
    if count < 1:
        raise ConfigError(f"builder: {builder.name!r} has no items to build (check its settings)")
    return count


def _chunk_ranges(builder: Builder, chunk_size: int, count: int) -> list[range]:
    """The builder's chunks, checked: non-empty consecutive ranges that cover every item once, in order."""
    ranges = [range(r.start, r.stop) for r in builder.chunk_ranges(chunk_size)]
    position = 0
    for r in ranges:
        if r.start != position or r.stop <= r.start:
            raise ValueError(f"builder {builder.name!r}: chunk_ranges must be consecutive non-empty ranges from 0, "
                             f"got {r} after item {position}")
        position = r.stop
    if position != count:
        raise ValueError(f"builder {builder.name!r}: chunk_ranges cover {position} of {count} items")
    return ranges


def plan_build(builder: Builder, out: str | os.PathLike, backbone=None, scorers: Mapping | None = None, *,
               chunk_size: int | None = None, name: str | None = None) -> BuildPlan:
    """The key and file names of ``builder``'s output in folder ``out`` (nothing is built or written).

    ``scorers`` is the built ``{name: Scorer}`` mapping; the builder picks the ones it uses (``select_scorers``).
    ``chunk_size`` overrides the builder's default; ``name`` the file prefix (default ``builder.name``)."""
    _check_backbone(builder, backbone)
    size = _chunk_size(builder, chunk_size)
    count = _num_items(builder)
    selected = builder.select_scorers(scorers)
    _check_resolution(builder, backbone, selected)
    settings = builder.key_fields()
    _check_json(settings, builder.name)
    fields = {
        "format": FORMAT, "builder": builder.name, "settings": settings, "num_items": count, "chunk_size": size,
        "backbone": backbone_key_fields(backbone) if builder.needs_backbone else None,
        "scorers": {k: scorer_fingerprint(v) for k, v in sorted(selected.items())},
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]
    folder = Path(os.path.abspath(Path(out).expanduser()))
    return BuildPlan(builder, name or builder.name, digest, fields, folder, count, size,
                     _chunk_ranges(builder, size, count), selected)


def output_path(builder: Builder, out: str | os.PathLike, backbone=None, scorers: Mapping | None = None, *,
                chunk_size: int | None = None, name: str | None = None) -> Path:
    """``<out>/<name>-<key>.parquet``: the file ``build`` / ``ensure_built`` write for these settings and models."""
    return plan_build(builder, out, backbone, scorers, chunk_size=chunk_size, name=name).output


# ---------------------------------------------------------------------------------------------------- shards
def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}: must be an integer, got {env[name]!r}") from None


def shard_from_env(index: int | None = None, count: int | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(shard index, shard count)``: the given ``index``/``count`` (config ``shard.index``/``shard.count``) if set;
    else a SLURM array task (``SLURM_ARRAY_TASK_ID`` relative to ``SLURM_ARRAY_TASK_MIN`` and ``_STEP``, count from
    ``SLURM_ARRAY_TASK_COUNT`` or ``_MAX``); else torchrun / Lightning (``RANK``, ``WORLD_SIZE``); else ``(0, 1)``."""
    env = os.environ if env is None else env
    if index is not None or count is not None:
        if index is None or count is None:
            raise ConfigError("shard.index / shard.count: set both (or neither: then they come from the SLURM array "
                              "or RANK / WORLD_SIZE)")
        source = "shard"
    elif "SLURM_ARRAY_TASK_ID" in env:
        task = _env_int(env, "SLURM_ARRAY_TASK_ID")
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        elif "SLURM_ARRAY_TASK_MAX" in env:
            count = (_env_int(env, "SLURM_ARRAY_TASK_MAX") - low) // max(step, 1) + 1
        else:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or _MAX; "
                              "set shard.index and shard.count")
        index, source = (task - low) // max(step, 1), "SLURM array"
    elif "RANK" in env and "WORLD_SIZE" in env:
        index, count, source = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "RANK / WORLD_SIZE"
    else:
        return 0, 1
    for value, key in ((index, "shard.index"), (count, "shard.count")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard.index must be in [0, shard.count), got index {index} of count {count} "
                          f"(from {source}; set shard.index and shard.count explicitly)")
    return index, count


# ---------------------------------------------------------------------------------------------------- files
@contextmanager
def _locked(path: Path, waiting: str):
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(waiting)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_table(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _checked_chunk(plan: BuildPlan, chunk: int, table) -> pa.Table:
    if not isinstance(table, pa.Table):
        raise TypeError(f"builder {plan.builder.name!r}: build_chunk returned {type(table).__name__}, "
                        f"not a pyarrow.Table (chunk {chunk})")
    schema = plan.builder.schema
    if schema is not None and not table.schema.equals(schema):
        if table.schema.names != schema.names:
            raise TypeError(f"builder {plan.builder.name!r}: chunk {chunk} has columns {table.schema.names}, "
                            f"the builder's schema {schema.names}")
        table = table.cast(schema)
    return table


def _build_chunks(plan: BuildPlan, chunks: list[int], backbone, progress: bool, label: str) -> int:
    """Build and write every chunk of ``chunks`` whose file is missing; returns how many were built."""
    from tqdm import tqdm

    plan.parts.mkdir(parents=True, exist_ok=True)
    todo = [c for c in chunks if not plan.chunk_path(c).exists()]
    # a builder whose item holds several units (PoolBuilder: a prompt = num_images images) says so with
    # ``units_per_item``, so the bar counts its ``item_unit`` (img/s); default 1
    # (LiVOBuilder, whose items differ in size, says it per chunk with ``item_units(items)``)
    weight = int(getattr(plan.builder, "units_per_item", 1))
    item_units = getattr(plan.builder, "item_units", None)
    units = (lambda c: int(item_units(plan.items(c)))) if callable(item_units) else \
        (lambda c: weight * len(plan.items(c)))
    total = sum(units(c) for c in chunks)
    done = total - sum(units(c) for c in todo)
    if done:
        _log(f"{label}: resuming, {len(chunks) - len(todo)} of {len(chunks)} chunks already built in {plan.parts}")
    with tqdm(total=total, initial=done, unit=plan.builder.item_unit, desc=label, file=sys.stderr,
              disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        for chunk in todo:
            items = plan.items(chunk)
            table = _checked_chunk(plan, chunk, plan.builder.build_chunk(items, backbone, plan.scorers))
            _write_table(table, plan.chunk_path(chunk))
            bar.update(units(chunk))
    return len(todo)


def _missing_chunks(plan: BuildPlan) -> list[int]:
    return [c for c in range(plan.num_chunks) if not plan.chunk_path(c).exists()]


def _merge(plan: BuildPlan, shards: int, backbone) -> int:
    """Concatenate every chunk in order, finalize, write the .json then the .parquet, remove the parts. The caller
    holds the lock and has checked that every chunk exists. Returns the row count."""
    started = time.monotonic()
    tables = [pq.read_table(plan.chunk_path(c)) for c in range(plan.num_chunks)]
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as err:
        raise TypeError(f"builder {plan.builder.name!r}: its chunks have different schemas ({err})") from err
    table = plan.builder.finalize(table).combine_chunks()
    info = {
        "builder": plan.builder.name, "key": plan.key, "file": plan.output.name, "rows": table.num_rows,
        **plan.builder.summary(table),
        "settings": plan.fields["settings"], "num_items": plan.num_items, "chunk_size": plan.chunk_size,
        "shards": shards,
        "backbone": None if backbone is None or not plan.builder.needs_backbone else {
            "name": str(getattr(backbone, "name", "")), "source": str(getattr(backbone, "source", None)),
            **plan.fields["backbone"]},
        "scorers": plan.fields["scorers"], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(json.dumps(info, indent=1, default=str) + "\n", plan.info)
    _write_table(table, plan.output)  # last: its presence marks a complete build
    shutil.rmtree(plan.parts, ignore_errors=True)
    _log(f"merged {plan.num_chunks} chunks into {plan.output} ({table.num_rows} rows, "
         f"{time.monotonic() - started:.1f}s)")
    return table.num_rows


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


# ---------------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    """What one :func:`build` call did. ``complete``: the output exists (this call or another process merged)."""

    path: Path
    complete: bool
    rows: int | None
    chunks_built: int
    chunks: int
    key: str


def build(builder: Builder, out: str | os.PathLike, backbone=None, scorers: Mapping | None = None, *,
          shard: tuple[int, int] | None = None, chunk_size: int | None = None, name: str | None = None,
          progress: bool = True) -> BuildResult:
    """Build this process's shard of ``builder`` into ``out`` and merge if it finished last.

    ``shard``: ``(index, count)``; None takes it from the environment (:func:`shard_from_env`). The chunks of
    other shards that already exist are left alone; the merge happens in whichever process finds every chunk."""
    plan = plan_build(builder, out, backbone, scorers, chunk_size=chunk_size, name=name)
    index, count = shard if shard is not None else shard_from_env()
    if plan.output.exists():
        shutil.rmtree(plan.parts, ignore_errors=True)  # a merge killed after its last write
        _log(f"{plan.output} exists (same settings and models): nothing to build")
        return BuildResult(plan.output, True, _rows(plan.output), 0, plan.num_chunks, plan.key)
    mine = [c for c in range(plan.num_chunks) if c % count == index]
    label = plan.name if count == 1 else f"{plan.name} shard {index}/{count}"
    built = _build_chunks(plan, mine, backbone, progress, label)
    with _locked(plan.lock, f"waiting for another process merging {plan.output}"):
        if plan.output.exists():
            return BuildResult(plan.output, True, _rows(plan.output), built, plan.num_chunks, plan.key)
        missing = _missing_chunks(plan)
        if not missing:
            rows = _merge(plan, count, backbone)
            return BuildResult(plan.output, True, rows, built, plan.num_chunks, plan.key)
    others = sorted({c % count for c in missing})
    _log(f"{label}: done ({len(mine)} chunks); {len(missing)} chunk(s) of shard(s) {others} still missing — "
         f"the last shard to finish merges them into {plan.output}")
    return BuildResult(plan.output, False, None, built, plan.num_chunks, plan.key)


def _env_rank() -> int:
    rank = os.environ.get("RANK")
    return 0 if rank in (None, "") else _env_int(os.environ, "RANK")


def _wait_for(path: Path, rank: int, poll_seconds: float, message_seconds: float, timeout: float | None) -> None:
    started = last_message = time.monotonic()
    _log(f"rank {rank}: waiting for rank 0 to build {path}")
    while not path.exists():
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise DataError(f"{path}: not built after {timeout:.0f} s of waiting (rank 0 builds it; did it fail?)")
        if now - last_message >= message_seconds:
            last_message = now
            _log(f"rank {rank}: still waiting for {path} ({now - started:.0f} s)")
        time.sleep(poll_seconds)


def ensure_built(builder: Builder, out: str | os.PathLike, backbone=None, scorers: Mapping | None = None, *,
                 chunk_size: int | None = None, name: str | None = None, rank: int | None = None,
                 poll_seconds: float = POLL_SECONDS, message_seconds: float = MESSAGE_SECONDS,
                 timeout: float | None = None, progress: bool = True) -> Path:
    """Return the path of ``builder``'s dataset in ``out``, building it first if it is missing.

    For training (``dataset.generate``), where every DDP rank calls this: rank 0 (``rank`` or the ``RANK``
    environment variable; a process without one counts as rank 0) builds every chunk itself (shard count 1) while
    holding the lock, so concurrent independent runs build it once; any other rank polls every ``poll_seconds``
    until the file exists (a message every ``message_seconds``; ``timeout`` seconds: DataError). A build killed
    part-way resumes from its finished chunks."""
    plan = plan_build(builder, out, backbone, scorers, chunk_size=chunk_size, name=name)
    if plan.output.exists():
        return plan.output
    rank = _env_rank() if rank is None else int(rank)
    if rank != 0:
        _wait_for(plan.output, rank, poll_seconds, message_seconds, timeout)
        return plan.output
    with _locked(plan.lock, f"waiting for another process building {plan.output}"):
        if not plan.output.exists():
            _build_chunks(plan, list(range(plan.num_chunks)), backbone, progress, plan.name)
            missing = _missing_chunks(plan)
            if missing:  # only if a file vanished under us
                raise DataError(f"{plan.chunk_path(missing[0])}: chunk disappeared while building")
            _merge(plan, 1, backbone)
    return plan.output


def build_table(builder: Builder, backbone=None, scorers: Mapping | None = None, *,
                chunk_size: int | None = None) -> pa.Table:
    """The rows ``build`` would write, made in this process and kept in memory (no files, no key)."""
    _check_backbone(builder, backbone)
    size = _chunk_size(builder, chunk_size)
    count = _num_items(builder)
    selected = builder.select_scorers(scorers)
    _check_resolution(builder, backbone, selected)
    plan = BuildPlan(builder, builder.name, "", {}, Path("."), count, size, _chunk_ranges(builder, size, count),
                     selected)
    tables = [_checked_chunk(plan, c, builder.build_chunk(plan.items(c), backbone, selected))
              for c in range(plan.num_chunks)]
    return builder.finalize(pa.concat_tables(tables)).combine_chunks()
