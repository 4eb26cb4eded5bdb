"""The experiment logger of a run (``logger`` config group): W&B (offline unless ``logger.offline=false``), CSV or
none. Shared by training and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


def build_logger(cfg: DictConfig, run_dir: Path | None = None):
    """The Lightning logger ``cfg.logger`` describes, or ``False`` when there is none. W&B never prompts: offline
    mode is set before it is imported, and its staging folder is kept inside ``run_dir``."""
    from alignment.config import instantiate_checked

    node = cfg.get("logger")
    if node is None or node.get("_target_") is None:
        return False
    if "Wandb" in str(node._target_):
        os.environ.setdefault("WANDB_SILENT", "true")
        if node.get("offline", False):
            os.environ["WANDB_MODE"] = "offline"  # also stops wandb from ever asking to log in
        if run_dir is not None:
            # W&B keeps files of logged tables/images in a staging folder until they are uploaded (offline: until
            # `wandb sync`); keep it in the run folder rather than ~/.local/share.
            os.environ.setdefault("WANDB_DATA_DIR", str(Path(run_dir) / "wandb" / "data"))
    return instantiate_checked(node, "logger")
