"""Checkpoint I/O, resume resolution and strategy configs (no training loop)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from alignment.errors import ConfigError
from alignment.cli import CONF_DIR
from alignment.training.checkpointing import AtomicCheckpointIO, resolve_resume


def test_atomic_save_keeps_the_previous_checkpoint_when_a_write_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def torn_write(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    restored = io.load_checkpoint(path)
    assert restored["global_step"] == 1 and torch.equal(restored["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no .tmp left behind


class Payload:
    """An arbitrary class: unpickling it would run code from the checkpoint author."""


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_resume_picks_the_newest_step_checkpoint(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    assert resolve_resume("auto", tmp_path / "run") is None  # nothing to resume: fresh start
    for name in ("step=000002.ckpt", "step=000010.ckpt", "step=000004.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    assert resolve_resume("auto", tmp_path / "run").endswith("step=000010.ckpt")
    assert resolve_resume(str(tmp_path / "run"), tmp_path / "other").endswith("step=000010.ckpt")
    assert resolve_resume(str(folder / "last.ckpt"), tmp_path).endswith("last.ckpt")
    with pytest.raises(ConfigError, match="resume: run folder .* has no checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_trainer_configs_compose(trainer, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={trainer}", f"output_dir={tmp_path}"])
    assert cfg.trainer.max_steps > 0
    if trainer == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
    if trainer == "fsdp":
        from hydra.utils import instantiate
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy)


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # installed by `make install` (the slurm extra)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", f"output_dir={tmp_path}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 1440
