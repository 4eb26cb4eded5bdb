"""Checkpoint I/O: atomic writes, safe loads, and finding the checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from alignment.errors import ConfigError
from alignment.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary file, fsyncs, then renames over the target (``alignment.files.atomic_write``): a run killed mid-write keeps the previous
    checkpoint intact. Loads with ``weights_only=True`` (no arbitrary unpickling)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)

        atomic_write(path, write, fsync=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir/checkpoints`` (``step=NNNNNN.ckpt``), else ``last.ckpt``.

    Step files are written atomically, so the newest one is complete even if the run was killed before it could
    refresh ``last.ckpt``.
    """
    folder = run_dir / CHECKPOINT_DIR
    steps = sorted(folder.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    if steps:
        return steps[-1]
    return folder / LAST if (folder / LAST).exists() else None


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """``resume``: null (fresh run), ``auto`` (this run folder's newest checkpoint if any), a run folder, or a
    .ckpt file."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        newest = newest_checkpoint(run_dir)
        return str(newest) if newest else None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        newest = newest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"resume: run folder {path} has no checkpoint in {CHECKPOINT_DIR}/")
        return str(newest)
    if not path.is_file():
        raise ConfigError(f"resume: {path} is neither a run folder nor a checkpoint file")
    return str(path)


# ------------------------------------------------------------------------------------------------ weight exports
# ``checkpoint.weights_every_n_steps``: every N optimizer steps (and at the end) the trained weights are written as
# a run folder of their own, ``<run>/checkpoints/step_<NNNNNN>/`` (lora/, unet/, conditioner/ as the run exports at
# the end, safetensors only, plus a copy of the run's config.yaml and step.json), so that an intermediate model loads
# like a finished run (``+models.x.run=<run>/checkpoints/step_000100``) without unpickling a Lightning checkpoint.
WEIGHTS_PREFIX = "step_"
STEP_FILE = "step.json"


def weights_folder(run_dir: Path, step: int) -> Path:
    """Where the weights exported at optimizer step ``step`` live."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{WEIGHTS_PREFIX}{int(step):06d}"


def saved_weight_steps(run_dir: Path) -> dict[int, Path]:
    """``{step: folder}`` of every complete weight export of a run (``checkpoints/step_NNNNNN/`` holding
    ``step.json``, written last), in step order."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = {}
    for path in folder.glob(f"{WEIGHTS_PREFIX}*") if folder.is_dir() else ():
        digits = path.name[len(WEIGHTS_PREFIX):]
        if path.is_dir() and digits.isdigit() and (path / STEP_FILE).is_file():
            found[int(digits)] = path
    return dict(sorted(found.items()))
