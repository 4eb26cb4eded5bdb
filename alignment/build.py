"""Dataset builder entry point: build the dataset file of one builder (``conf/builder/NAME.yaml``).

    python -m alignment.build toy_pairs backbone=toy                       # <out>/pairs-<key>.parquet
    python -m alignment.build synthetic builder.num_rows=4096 out=/data/pairs
    python -m alignment.build toy_pairs backbone=toy --cfg job             # print the composed config

``NAME`` (the first argument) stands for the override ``builder=NAME``; every other argument is a Hydra override of
``conf/build.yaml``: ``out`` (the folder), ``builder.<option>``, ``backbone=...`` (built only if the builder samples
images), ``scorers=[...]``, ``chunk_size`` (items per chunk; part of the file's key), ``device``,
``shard.index`` / ``shard.count``. Every key is checked before any model is built; a bad one is one line,
``error: ...``, exit status 2. The output is ``<out>/<name>-<key>.parquet`` plus a ``.json`` with the settings and
statistics; the key covers the builder's settings and the models' weights, so an existing file is reused only when
it is what this command would build, and then the command does nothing (see :mod:`alignment.builders.runner`).

Resumable: chunks land in ``<out>/.<name>-<key>.parts/`` one atomic file at a time; after a kill, the same command
goes on from the finished chunks.

Many processes: chunk ``c`` is built by shard ``c % count``; every shard, when done, merges if it finds all chunks,
so the last one to finish writes the file (the same file one process writes). The shard comes from
``shard.index`` / ``shard.count`` if set, else from a SLURM array (``SLURM_ARRAY_TASK_ID`` / ``_COUNT``), else from
torchrun (``RANK`` / ``WORLD_SIZE``)::

    python -m alignment.build toy_pairs backbone=toy -m shard.index=0,1,2,3 shard.count=4 \\
        hydra/launcher=slurm hydra.launcher.partition=gpu      # one SLURM array job per shard (submitit)
    sbatch --array=0-3 --wrap "python -m alignment.build toy_pairs backbone=toy"   # shards from the array
    torchrun --nproc-per-node=4 -m alignment.build toy_pairs backbone=toy       # one shard per process

Training builds what it needs through ``alignment.builders.runner.ensure_built`` instead (rank 0 builds, the other
ranks wait).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from alignment.cli import CONF_DIR, entry_point
from alignment.errors import ConfigError

HELP_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "--version")
# Hydra's flags that take a value (``--cfg job``); ``--info`` takes one optionally.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def available_builders() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "builder").glob("*.yaml"))


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the other arguments, each in order. Hydra's argument parser wants every
    override after the last flag; here ``NAME -m shard.index=0,1`` is as good as ``-m NAME shard.index=0,1``."""
    flags, others, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                                 and argv[i + 1] in INFO_TOPICS)
            if takes_value and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            others.append(arg)
        i += 1
    return flags, others


def translate_argv(argv: list[str]) -> list[str]:
    """``NAME [flags and overrides]`` -> ``[flags] builder=NAME [overrides]``: the first argument that is neither a
    flag, a flag's value nor an override (``key=value``, ``~key``) is the builder's name."""
    flags, others = split_flags(argv)
    if others and NAME_PATTERN.fullmatch(others[0]):
        others = [f"builder={others[0]}", *others[1:]]
    return flags + others


def missing_builder_error(argv: list[str]) -> str | None:
    """The one-line message when no builder is named (Hydra's own is several lines), else None."""
    if any(arg.split("=")[0] in HELP_FLAGS for arg in argv):
        return None
    if any(re.match(r"^[+~]*builder=", arg) for arg in argv):
        return None
    return (f"builder: name the dataset to build: python -m alignment.build NAME [overrides] "
            f"(available in conf/builder/: {', '.join(available_builders())})")


def _out_folder(value) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"out: must be a folder path, got {value!r}")
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"out: {folder} exists and is not a folder")
    return folder


def _chunk_size(value) -> int | None:
    from alignment.config import positive_int

    return None if value is None else positive_int(value, "chunk_size")


def used_scorer_nodes(builder, cfg: DictConfig) -> dict:
    """The ``scorers`` entries the builder will read (what its ``select_scorers`` picks from the configured names),
    so that a configured scorer it does not use is not built (a toxicity-only LiVO build loads no attribute
    classifier). ``select_scorers`` is asked with the names standing in for the scorers; it only picks them."""
    nodes = cfg.get("scorers") or {}
    configured = [str(name) for name in nodes]
    picked = builder.select_scorers({name: name for name in configured})
    return {name: nodes[name] for name in configured if name in picked}


def build_dataset(cfg: DictConfig):
    """Check every key, build the models the builder needs, build this process's shard (and merge if last)."""
    import random

    import numpy as np
    import torch

    from alignment.builders.base import Builder
    from alignment.builders.runner import build, check_scorer_config, shard_from_env
    from alignment.config import check_keys, instantiate_checked, resolve_device
    from alignment.scorers.base import build_scorers

    # Every cheap check before a model is built.
    shard = cfg.get("shard") or {}
    index, count = shard_from_env(shard.get("index"), shard.get("count"))
    chunk_size = _chunk_size(cfg.get("chunk_size"))
    out = _out_folder(cfg.get("out"))
    device = resolve_device(cfg.get("device"))
    builder = instantiate_checked(cfg.builder, "builder")
    if not isinstance(builder, Builder):
        raise ConfigError(f"builder._target_: {cfg.builder._target_} does not build an alignment Builder")
    if builder.needs_backbone:
        check_keys(cfg.backbone, "backbone")
    for name in cfg.get("scorers") or {}:
        entry = cfg.scorers[name]
        if entry is None or "_target_" not in entry:
            raise ConfigError(f"scorers.{name}: needs a _target_ (see conf/scorers/)")
        check_keys(entry, f"scorers.{name}")
    # the scorers the builder reads are configured and can score the backbone's resolution (one line, no model yet)
    check_scorer_config(builder, cfg.get("scorers"),
                        cfg.backbone.get("resolution") if builder.needs_backbone else None)

    # Model construction may draw random numbers (random-init weights); the builder's own draws use its seed.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    backbone = None
    if builder.needs_backbone:
        # As the config builds it, modes included (no .eval()): the backbone ensure_toy_pairs and training hand to
        # ensure_built is the same, so the same key means the same bytes (the modes are part of the key).
        backbone = instantiate_checked(cfg.backbone, "backbone").to(device)
    scorers = {name: scorer.to(device) for name, scorer in build_scorers(used_scorer_nodes(builder, cfg)).items()}

    result = build(builder, out, backbone, scorers, shard=(index, count), chunk_size=chunk_size,
                   progress=bool(cfg.get("progress", True)))
    if result.complete:
        print(f"done: {result.path} ({result.rows} rows)")
    else:
        print(f"done: shard {index}/{count} of {result.path} ({result.chunks_built} chunks built; the last shard "
              f"to finish merges)")
    return result


@entry_point("build")
def _hydra_main(cfg: DictConfig):
    return build_dataset(cfg)


def main(argv: list[str] | None = None):
    """``python -m alignment.build NAME [overrides]``: NAME becomes ``builder=NAME`` before the override check and
    Hydra read ``sys.argv``."""
    args = translate_argv(sys.argv[1:] if argv is None else list(argv))
    message = missing_builder_error(args)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    return _hydra_main()


if __name__ == "__main__":
    main()
