"""Shared test setup: offline hub, generated data kept in a temp folder, a helper to run the CLIs like a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the test suite may download
os.environ.setdefault("WANDB_MODE", "offline")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """ALIGNMENT_DATA_DIR for every run of the session: the synthetic pairs are generated once, here."""
    path = tmp_path_factory.mktemp("generated_data")
    os.environ["ALIGNMENT_DATA_DIR"] = str(path)
    return path


def run_cli(module: str, *overrides: str, cwd: Path | None = None, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <overrides...>`` in a subprocess, as a user types it; returns the finished process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


FAST_RUN = ("logger=none", "samples.every_n_steps=0")
# The shared training run's LoRA has alpha != rank, so a loader that ignored the stored alpha would be caught.
TRAINED_LORA_RANK, TRAINED_LORA_ALPHA = 4, 8


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Three DPO steps on the tiny backbone (seed 0) with a large learning rate, so the exported LoRA is clearly
    non-zero; shared by every test that needs a real training output."""
    tmp = tmp_path_factory.mktemp("trained_run")
    run_dir = tmp / "run"
    proc = run_cli("alignment.run", *FAST_RUN, "trainer.max_steps=3", "method.optimizer.lr=1e-3",
                   f"method.lora.rank={TRAINED_LORA_RANK}", f"method.lora.alpha={TRAINED_LORA_ALPHA}",
                   f"hydra.run.dir={run_dir}", env={"ALIGNMENT_DATA_DIR": str(tmp / "data")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def random_lora_dir(tmp_path_factory) -> Path:
    """A LoRA (rank 4) with non-zero up weights on the tiny backbone, saved the way training exports it."""
    import torch

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.training.lora import add_lora, save_lora

    backbone = build_tiny_backbone()
    add_lora(backbone.unet, rank=4, alpha=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in backbone.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(backbone.unet, folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine two spinning threads per process slowed small ops ~10× under load. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lora_backbone(seed: int | None = 123, rank: int = 4):
    """The tiny backbone with a LoRA; ``seed`` not None: the LoRA B weights drawn N(0, 0.05) from it, so the policy
    differs from the reference (B starts at zero, where they are equal)."""
    import torch

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.training.lora import add_lora

    backbone = build_tiny_backbone(seed=0)
    add_lora(backbone.unet, rank=rank, alpha=rank)
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in backbone.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return backbone
