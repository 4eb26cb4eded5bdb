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
