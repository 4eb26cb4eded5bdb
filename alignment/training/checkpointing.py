"""Checkpoint I/O: atomic writes, safe loads, and finding the checkpoint to resume from."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from alignment.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<name>.tmp``, fsyncs, then renames over the target: a run killed mid-write keeps the previous
    checkpoint intact. Loads with ``weights_only=True`` (no arbitrary unpickling)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """``resume``: null (fresh run), ``auto`` (this run folder's last checkpoint if any), a run folder, or a .ckpt."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        last = run_dir / CHECKPOINT_DIR / LAST
        return str(last) if last.exists() else None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        last = path / CHECKPOINT_DIR / LAST
        if not last.exists():
            raise ConfigError(f"resume: run folder {path} has no {CHECKPOINT_DIR}/{LAST}")
        return str(last)
    if not path.is_file():
        raise ConfigError(f"resume: {path} is neither a run folder nor a checkpoint file")
    return str(path)
