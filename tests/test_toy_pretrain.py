"""The toy backbone's pretraining script: a run stopped and resumed gives the same weights as one that ran through,
and its export loads as the ``toy`` backbone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "toy_world" / "pretrain.py"
TINY = ["corpus.n=48", "vae.steps=4", "vae.batch_size=4", "vae.warmup=2", "vae.scale_samples=16",
        "unet.steps=4", "unet.batch_size=4", "unet.warmup=2", "checkpoint_every=2"]


def _script():
    spec = importlib.util.spec_from_file_location("toy_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, out: Path, *extra: str) -> None:
    argv = ["--out", str(out), "--no-probe"]
    for item in TINY:
        argv += ["--set", item]
    script.main(argv + list(extra))


def test_stopped_and_resumed_equals_straight_through(tmp_path, data_dir):
    from safetensors.torch import load_file

    from alignment.toy.backbone import build_toy_backbone

    script = _script()
    _run(script, tmp_path / "straight", "--export", str(tmp_path / "w_straight"))
    _run(script, tmp_path / "resumed", "--stop-at-step", "2")  # VAE stops at step 2
    assert not torch.load(str(tmp_path / "resumed" / "vae.pt"), weights_only=True)["done"]
    _run(script, tmp_path / "resumed", "--stop-at-step", "2")  # VAE finishes, UNet stops at step 2
    assert torch.load(str(tmp_path / "resumed" / "unet.pt"), weights_only=True)["step"] == 2
    _run(script, tmp_path / "resumed", "--export", str(tmp_path / "w_resumed"))
    a = load_file(str(tmp_path / "w_straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "w_resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    backbone = build_toy_backbone(weights=str(tmp_path / "w_resumed"))
    assert backbone.vae.config.scaling_factor != 0.18215  # measured from the trained VAE's latents
    logged = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    assert any('"stage": "unet"' in line for line in logged)
