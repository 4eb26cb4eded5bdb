"""The experiment logger of a run (``logger`` config group): W&B (offline unless ``logger.offline=false``), CSV or
none. Shared by training and evaluation.

In a Hydra multirun (``python -m alignment.run -m method.beta=1000,2000 ...``) every job's W&B run is grouped by
the sweep and tagged with its overrides, read from Hydra's runtime config (``sweep_context``): ``group`` = the
sweep folder's last two parts (``dpo-tiny/2025-01-01_12-00-00`` for ``multirun/dpo-tiny/2025-01-01_12-00-00``),
``tags`` = the job's overrides (``method.beta=1000``, ...; a tag longer than W&B's 64 characters is shortened),
``job_type`` = the entry point (``train``, ``evaluate``) and the run name gets ``-job<N>`` (Hydra's job number).
``logger.group`` / ``logger.job_type`` set in the config win; ``logger.tags`` are kept, the overrides added. A single
run, or a logger built outside Hydra (tests, scripts), gets none of these.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


MAX_TAG_LENGTH = 64  # wandb.init refuses longer tags
JOB_TYPES = {"run": "train"}  # Hydra's job name (the entry point's module) -> W&B job_type


def wandb_tag(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_TAG_LENGTH else text[:MAX_TAG_LENGTH - 3] + "..."


def sweep_context() -> dict | None:
    """This job's place in a Hydra multirun: ``{"group", "tags", "job_num", "job_type", "overrides", "sweep_dir"}``,
    or ``None`` in a single run and outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = str(hydra_cfg.sweep.dir)
        overrides = [str(o) for o in (hydra_cfg.overrides.task or [])]
        job_num = int(hydra_cfg.job.num)
        job_name = str(hydra_cfg.job.name or "")
    except Exception:  # noqa: BLE001 - no (complete) Hydra runtime config: not a sweep job
        return None
    group = "/".join(Path(sweep_dir).parts[-2:]) or sweep_dir
    return {"group": group, "tags": [wandb_tag(o) for o in overrides if o], "job_num": job_num,
            "job_type": JOB_TYPES.get(job_name, job_name) or None, "overrides": overrides, "sweep_dir": sweep_dir}


def sweep_settings(node) -> dict:
    """The W&B ``group`` / ``tags`` / ``job_type`` / ``name`` of a multirun job (see the module docstring); empty
    in a single run."""
    sweep = sweep_context()
    if sweep is None:
        return {}
    tags = [str(t) for t in (node.get("tags") or [])]
    out = {"tags": tags + [t for t in sweep["tags"] if t not in tags]}
    if node.get("group") in (None, ""):
        out["group"] = sweep["group"]
    if node.get("job_type") in (None, "") and sweep["job_type"]:
        out["job_type"] = sweep["job_type"]
    name = node.get("name")
    out["name"] = f"{name}-job{sweep['job_num']}" if name else f"job{sweep['job_num']}"
    return out


def finish_active_wandb_run() -> None:
    """Close a W&B run left open in this process. Hydra's basic launcher runs the jobs of a multirun one after the
    other in one process; without this, Lightning's WandbLogger would reuse the first job's run for every job."""
    import sys

    wandb = sys.modules.get("wandb")  # not imported: no run can be open
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


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
        finish_active_wandb_run()
        return instantiate_checked(node, "logger", **sweep_settings(node))
    return instantiate_checked(node, "logger")
