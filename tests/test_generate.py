"""``python -m alignment.generate``: end to end on the tiny backbone, the exported LoRA read by stock diffusers, and
one-line errors for bad input.

The slow tests share one short training run (``trained_run``) whose LoRA has rank 4 and alpha 8, so a loader that
ignored the alpha stored with the weights (scale 2) would not reproduce the trained policy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from alignment import generate as gen
from alignment.errors import ConfigError, DataError
from alignment.training.lora import LORA_WEIGHT_NAME, add_lora, save_lora
from tests.conftest import TRAINED_LORA_ALPHA, TRAINED_LORA_RANK

PYTHON = sys.executable
PROMPTS = ["a red circle on a white background", "a blue square on a white background"]
LORA_RANK, LORA_ALPHA = TRAINED_LORA_RANK, TRAINED_LORA_ALPHA


def env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNMENT_DATA_DIR": str(tmp / "data"), "WANDB_MODE": "disabled"}


def run_module(module: str, args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=env(cwd), capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def generate_cli(cwd: Path, out_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_module("alignment.generate", [f"hydra.run.dir={out_dir.parent / (out_dir.name + '_hydra')}",
                                             f"out_dir={out_dir}", "num_inference_steps=3", *args], cwd, check)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def read_index(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    # transformers prints a torchvision notice on some imports; everything else on stderr must be our one line
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# ------------------------------------------------------------------------------------------- 1. end to end
@pytest.mark.slow
def test_generate_end_to_end(trained_run, prompt_file, tmp_path):
    # One process, a Hydra sweep of two jobs: job 0 without adapter, job 1 with the run folder as adapter.
    sweep = tmp_path / "sweep"
    proc = run_module("alignment.generate", ["-m", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
                                             f"prompts={prompt_file}", "seeds=[0,1]", "num_inference_steps=3",
                                             f"adapter=null,{trained_run}"], tmp_path)
    base, tuned = sweep / "0" / "images", sweep / "1" / "images"  # out_dir defaults to <job dir>/images
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert len(summaries) == 2 and str(base) in summaries[0] and str(tuned) in summaries[1]
    names = [f"{i:05d}_seed{s}.png" for i in range(2) for s in (0, 1)]
    for out in (base, tuned):
        assert sorted(p.name for p in out.iterdir()) == sorted(names + ["grid.png", "index.jsonl"])
        assert Image.open(out / "grid.png").size == (2 * 32, 2 * 32)  # one row per prompt, one column per seed
    index = read_index(base)
    assert [r["file"] for r in index] == names
    assert [(r["prompt_index"], r["prompt"], r["seed"]) for r in index] == [
        (i, PROMPTS[i], s) for i in range(2) for s in (0, 1)]
    assert all(r["adapter"] is None and r["steps"] == 3 and r["guidance"] == 7.5 for r in index)
    tuned_index = read_index(tuned)
    assert [r["file"] for r in tuned_index] == names
    assert all(r["adapter"] == str(trained_run / "lora" / LORA_WEIGHT_NAME) and r["lora_scale"] == 1.0
               for r in tuned_index)
    first = {n: pixels(base / n) for n in names}
    assert not np.array_equal(first[names[0]], first[names[1]])  # another seed, another image

    # With the trained adapter every image changes.
    diffs = [int(np.abs(first[n] - pixels(tuned / n)).max()) for n in names]
    changed = [float((first[n] != pixels(tuned / n)).any(-1).mean()) for n in names]
    print(f"\nCLI base-vs-adapter uint8 max|diff| per image {diffs}; changed pixel fraction "
          f"{[round(c, 3) for c in changed]}")
    assert min(diffs) > 0, diffs

    # Same seeds without adapter again, in another process, into the same folder: identical pixels, and the
    # folder is rewritten consistently (same files, same index, one summary line naming it).
    proc = generate_cli(tmp_path, base, f"prompts={prompt_file}", "seeds=[0,1]")
    summary = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(summary) == 1 and str(base) in summary[0]
    assert sorted(p.name for p in base.iterdir()) == sorted(names + ["grid.png", "index.jsonl"])
    assert all(np.array_equal(first[n], pixels(base / n)) for n in names)
    assert read_index(base) == index


# --------------------------------------------------------------- 2. the saved LoRA read by stock diffusers
def fixed_unet_inputs(pipe):
    gen_ = torch.Generator().manual_seed(1234)
    latents = torch.randn((1, 4, 16, 16), generator=gen_)
    t = torch.tensor([500])
    tokens = pipe.tokenizer(["a red circle on a white background"], padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids)[0]
    return latents, t, hidden


@torch.no_grad()
def stock_outputs(pipe, inputs):
    latents, t, hidden = inputs
    unet_out = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
    image = pipe(PROMPTS[0], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    return unet_out, image


@pytest.mark.slow
def test_saved_lora_loads_in_stock_diffusers_and_equals_trained_policy(trained_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from alignment.backbones.tiny import build_tiny_backbone

    build_tiny_backbone().save_pretrained(tmp_path / "tiny_sd")  # the base the run trained (backbone seed 0)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny_sd", safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    inputs = fixed_unet_inputs(pipe)
    base_out, base_image = stock_outputs(pipe, inputs)

    pipe.load_lora_weights(str(trained_run / "lora"))  # exactly what a user of stock diffusers would call
    lora_out, lora_image = stock_outputs(pipe, inputs)
    unet_diff = (lora_out - base_out).abs().max().item()
    image_diff = float(np.abs(lora_image - base_image).max())
    print(f"\nstock UNet base-vs-LoRA max|diff| = {unet_diff:.3e}; stock image max|diff| = {image_diff:.3e}")
    assert unet_diff > 1e-3, unet_diff      # measured 4.8e-2 (rank 4, alpha 8, 3 DPO steps at lr 1e-3)
    assert image_diff > 1e-3, image_diff    # measured 1.0e-2 (pixels in [0, 1])

    # Our trained policy, rebuilt without the exported file: a fresh tiny backbone + peft LoRA with the run's
    # rank/alpha, loaded with the adapter weights of the last training checkpoint (written at the final step).
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    policy = build_tiny_backbone()
    add_lora(policy.unet, rank=LORA_RANK, alpha=LORA_ALPHA)
    prefix = "backbone.unet."
    lora_params = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    assert lora_params and all(".lora_" in k for k in lora_params)
    result = policy.unet.load_state_dict(lora_params, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k]
    latents, t, hidden = inputs
    with torch.no_grad():
        ours = policy.unet_forward(latents, t, {"encoder_hidden_states": hidden})
        with policy.reference_unet() as ref:
            ours_base = policy.unet_forward(latents, t, {"encoder_hidden_states": hidden}, unet=ref)
    print(f"trained policy vs stock LoRA UNet max|diff| = {(ours - lora_out).abs().max().item():.3e}; "
          f"reference vs stock base = {(ours_base - base_out).abs().max().item():.3e}")
    torch.testing.assert_close(ours, lora_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_base, base_out, atol=1e-5, rtol=0)

    # And the loader python -m alignment.generate uses (diffusers' load_lora_weights on our backbone) agrees too.
    loaded = build_tiny_backbone()
    gen.load_adapter(loaded, trained_run / "lora" / LORA_WEIGHT_NAME)
    with torch.no_grad():
        via_generate = loaded.unet_forward(latents, t, {"encoder_hidden_states": hidden})
    print(f"generate's loader vs stock LoRA UNet max|diff| = {(via_generate - lora_out).abs().max().item():.3e}")
    torch.testing.assert_close(via_generate, lora_out, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- lora_scale (fast, in-process LoRA)
@pytest.fixture()
def random_lora(random_lora_dir) -> Path:
    """The weights file of the shared random LoRA (conftest.random_lora_dir)."""
    return random_lora_dir / LORA_WEIGHT_NAME


def test_lora_scale(random_lora):
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.sampling.sample import sample_images

    backbone = build_tiny_backbone()
    sample = lambda: sample_images(backbone, PROMPTS[:1], [0], num_inference_steps=2)  # noqa: E731
    base = sample()
    pipe = gen.load_adapter(backbone, random_lora, scale=0.0)
    off = sample()
    pipe.set_adapters([gen.ADAPTER_NAME], adapter_weights=[1.0])
    full = sample()
    pipe.set_adapters([gen.ADAPTER_NAME], adapter_weights=[2.0])
    double = sample()
    assert torch.equal(off, base)                      # lora_scale=0 is the base model
    assert (full - base).abs().max() > 1e-3
    assert (double - full).abs().max() > 1e-3          # the scale is applied, not just on/off


def test_rerun_into_same_folder_replaces_stale_files(random_lora, tmp_path):
    from hydra import compose, initialize_config_dir

    from alignment.cli import CONF_DIR

    out = tmp_path / "images"
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        first = compose("generate", overrides=["prompt=a red circle", "seeds=[0,1,2]", "num_inference_steps=2",
                                               f"out_dir={out}"])
        second = compose("generate", overrides=["prompt=a red circle", "seeds=[1]", "num_inference_steps=2",
                                                f"out_dir={out}", "grid=false", f"adapter={random_lora.parent}",
                                                "lora_scale=0.5"])
    gen.generate(first)
    assert len(read_index(out)) == 3 and (out / "grid.png").exists()
    gen.generate(second)
    assert sorted(p.name for p in out.iterdir()) == ["00000_seed1.png", "index.jsonl"]
    (record,) = read_index(out)
    assert record["seed"] == 1 and record["lora_scale"] == 0.5 and record["adapter"] == str(random_lora)


def test_sd15_backbone_from_a_saved_folder_gives_the_same_images(random_lora, tmp_path):
    """``backbone=sd15 backbone.pretrained_model_name_or_path=<folder>`` (the node training uses) works, and the
    tiny backbone saved as a diffusers folder gives pixel-identical images with the same adapter and seeds."""
    from hydra import compose, initialize_config_dir

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.cli import CONF_DIR

    build_tiny_backbone().save_pretrained(tmp_path / "tiny_sd")
    common = ["prompt=a red circle", "seeds=[0,1]", "num_inference_steps=2", "grid=false", f"adapter={random_lora}"]
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        tiny = compose("generate", overrides=[*common, f"out_dir={tmp_path / 'tiny'}"])
        sd15 = compose("generate", overrides=[*common, f"out_dir={tmp_path / 'sd15'}", "backbone=sd15",
                                              f"backbone.pretrained_model_name_or_path={tmp_path / 'tiny_sd'}",
                                              "backbone.resolution=32"])
    gen.generate(tiny)
    gen.generate(sd15)
    assert [r["backbone"] for r in read_index(tmp_path / "sd15")] == ["sd15", "sd15"]
    for name in ("00000_seed0.png", "00000_seed1.png"):
        assert np.array_equal(pixels(tmp_path / "tiny" / name), pixels(tmp_path / "sd15" / name))


# ------------------------------------------------------------------------------------------- 3. bad input
def run_main(monkeypatch, capsys, tmp_path, *overrides: str) -> str:
    """Call the Hydra entry point in-process; it must exit 2 after printing one ``error:`` line."""
    monkeypatch.setattr(sys, "argv", ["generate", f"hydra.run.dir={tmp_path / 'hydra'}",
                                      f"out_dir={tmp_path / 'out'}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        gen.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out" / "index.jsonl").exists()
    return lines[0]


def test_error_missing_prompt_file(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    line = run_main(monkeypatch, capsys, tmp_path, f"prompts={missing}")
    assert line.startswith("error: prompts:") and str(missing) in line


def test_error_neither_prompts_nor_prompt(monkeypatch, capsys, tmp_path):
    line = run_main(monkeypatch, capsys, tmp_path)
    assert "prompts" in line and "prompt" in line and "neither" in line


def test_error_both_prompts_and_prompt(monkeypatch, capsys, tmp_path, prompt_file):
    line = run_main(monkeypatch, capsys, tmp_path, f"prompts={prompt_file}", "prompt=a cat")
    assert "prompts / prompt" in line and "both" in line


def test_error_adapter_does_not_exist(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no_run"
    line = run_main(monkeypatch, capsys, tmp_path, "prompt=a cat", f"adapter={missing}")
    assert line.startswith("error: adapter:") and str(missing) in line and "does not exist" in line


def test_error_adapter_without_weights(monkeypatch, capsys, tmp_path):
    run = tmp_path / "empty_run"
    (run / "lora").mkdir(parents=True)
    line = run_main(monkeypatch, capsys, tmp_path, "prompt=a cat", f"adapter={run}")
    assert line.startswith("error: adapter:") and str(run) in line and LORA_WEIGHT_NAME in line


def test_error_empty_seeds(monkeypatch, capsys, tmp_path):
    line = run_main(monkeypatch, capsys, tmp_path, "prompt=a cat", "seeds=[]")
    assert line.startswith("error: seeds:")


def test_error_lora_of_another_architecture(monkeypatch, capsys, tmp_path):
    from alignment.backbones.tiny import build_tiny_backbone

    other = build_tiny_backbone(unet_channels=(32, 96))
    add_lora(other.unet, rank=4)
    weights = save_lora(other.unet, tmp_path / "other_lora")
    line = run_main(monkeypatch, capsys, tmp_path, "prompt=a cat", f"adapter={weights}",
                    "num_inference_steps=1")
    assert line.startswith("error: adapter: cannot load") and str(weights) in line and "size mismatch" in line


@pytest.mark.parametrize("call, kind, key", [
    (lambda: gen.check_seeds(4), ConfigError, "seeds:"),
    (lambda: gen.check_seeds([0, "a"]), ConfigError, "seeds:"),
    (lambda: gen.check_seeds([1, 1]), ConfigError, "seeds:"),
    (lambda: gen.load_prompts(None, ["a", "b"]), ConfigError, "prompt:"),
    (lambda: gen.resolve_device("warp-drive"), ConfigError, "device:"),
])
def test_small_checks(call, kind, key):
    with pytest.raises(kind, match=key):
        call()


def test_adapter_forms(tmp_path, random_lora):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / LORA_WEIGHT_NAME).write_bytes(random_lora.read_bytes())
    assert gen.resolve_adapter(None) is None
    assert gen.resolve_adapter(str(run)) == run / "lora" / LORA_WEIGHT_NAME            # a training run folder
    assert gen.resolve_adapter(str(run / "lora")) == run / "lora" / LORA_WEIGHT_NAME   # the LoRA folder
    assert gen.resolve_adapter(str(random_lora)) == random_lora                         # the file itself
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a .safetensors"):
        gen.resolve_adapter(str(tmp_path / "notes.txt"))


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    proc = generate_cli(tmp_path, tmp_path / "out", f"prompts={tmp_path / 'missing.txt'}", check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert lines == [f"error: prompts: prompt file {tmp_path / 'missing.txt'} does not exist"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_prompt_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"prompts: .*{empty}"):
        gen.load_prompts(str(empty), None)
