"""The sampler choice (alignment.sampling.sample.make_sampler; docs/sampling.md#the-sampler): DPMSolverMultistep
besides DDIM in sample_images, generate, evaluate's image cache and the pool builder.

The tiny random backbone checks the mechanics (shapes, determinism, batch independence, no state between calls, the
same images as a stock diffusers pipeline with the same scheduler); the trained toy backbone checks that with many
steps both samplers land on the same image for a seed (they solve the same ODE from the same start).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from alignment.errors import ConfigError
from alignment.sampling.sample import SAMPLERS, make_sampler, sample_images, sampler_identity, seed_latents
from tests.conftest import run_cli

STEPS = 5
PROMPTS = ["a red square", "a blue circle"]
SEEDS = [0, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def backbone():
    from alignment.backbones.tiny import build_tiny_backbone

    return build_tiny_backbone()


def sample(backbone, prompts=PROMPTS, seeds=SEEDS, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 5.0)
    return sample_images(backbone, list(prompts), list(seeds), **kwargs)


# ------------------------------------------------------------------------------------------------ the scheduler
def test_make_sampler_builds_fresh_schedulers_from_the_backbone_config(backbone):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim, dpm, dpm_again = (make_sampler(backbone, "ddim"), make_sampler(backbone, "dpmsolver"),
                            make_sampler(backbone, "dpmsolver"))
    assert SAMPLERS == ("ddim", "dpmsolver")
    assert type(ddim) is DDIMScheduler and type(dpm) is DPMSolverMultistepScheduler and dpm is not dpm_again
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    for name in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert dpm.config[name] == ddim.config[name] == backbone.sample_scheduler.config[name]
    assert dict(ddim.config) == dict(DDIMScheduler.from_config(backbone.sample_scheduler.config).config)


def test_unknown_sampler_is_one_line_error_naming_the_key(backbone):
    with pytest.raises(ConfigError, match=r"^method\.sampler must be one of ddim, dpmsolver, got 'euler'$") as err:
        make_sampler(backbone, "euler", "method.sampler")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^sampler must be one of ddim, dpmsolver, got 'DDIM'$"):
        sample(backbone, sampler="DDIM")


def test_eta_is_ddim_only(backbone):
    with pytest.raises(ValueError, match=r"^eta=0\.5: eta is a DDIM setting, DPMSolverMultistepScheduler has none"):
        sample(backbone, sampler="dpmsolver", eta=0.5)


# ------------------------------------------------------------------------------------------------ DPMSolver images
def test_dpmsolver_images_are_finite_deterministic_and_not_ddim(backbone):
    first = sample(backbone, sampler="dpmsolver")
    again = sample(backbone, sampler="dpmsolver")
    ddim = sample(backbone)
    assert first.shape == (2, 3, backbone.resolution, backbone.resolution) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again)                                  # same seeds, same images
    assert (first[0] - first[1]).abs().max() > 1e-2                   # different prompts and seeds
    assert (first - ddim).abs().amax(dim=(1, 2, 3)).min() > 1e-2      # another sampler: other images


def test_default_sampler_is_ddim_unchanged(backbone):
    """``sampler`` defaults to ddim, built exactly as before the choice existed (bit-identical images), and its
    cache identity is the one the evaluation cache always used (DDIM images cached earlier are still reused)."""
    from diffusers import DDIMScheduler

    default = sample(backbone)
    assert torch.equal(default, sample(backbone, sampler="ddim"))
    assert torch.equal(default, sample(backbone, scheduler=DDIMScheduler.from_config(backbone.sample_scheduler.config)))
    assert sampler_identity("ddim") == {"scheduler": "ddim", "eta": 0.0}
    assert sampler_identity("dpmsolver") == {"scheduler": "dpmsolver", "algorithm_type": "dpmsolver++",
                                             "solver_order": 2}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_image_does_not_depend_on_its_batch(backbone, sampler):
    """Image (prompt, seed) alone equals the same image inside a larger, differently ordered batch (float noise of
    batched kernels only), and a batch sampled after another one is unchanged: no state crosses calls."""
    batch = sample(backbone, ["a green star", *PROMPTS, "a red square"], [7, *SEEDS, 11], sampler=sampler)
    alone = torch.cat([sample(backbone, [p], [s], sampler=sampler) for p, s in zip(PROMPTS, SEEDS)])
    torch.testing.assert_close(batch[1:3], alone, atol=1e-5, rtol=0)
    # one scheduler instance reused for two calls (set_timesteps resets a multistep solver's history)
    shared = make_sampler(backbone, sampler)
    sample(backbone, ["a green star"], [7], scheduler=shared)
    assert torch.equal(sample(backbone, scheduler=shared), sample(backbone, sampler=sampler))


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_dpmsolver_matches_the_stock_diffusers_pipeline(backbone, guidance_scale):
    """The guided DPMSolver step (uncond‖cond batched, ε_u + s·(ε_c − ε_u), then ``scheduler.step``) gives the
    images of diffusers' own StableDiffusionPipeline with DPMSolverMultistepScheduler from the same start noise
    (and without guidance, the conditional branch alone)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=make_sampler(backbone, "dpmsolver"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(PROMPTS, latents=seed_latents(backbone, SEEDS), num_inference_steps=STEPS,
                 guidance_scale=guidance_scale, output_type="pt", height=backbone.resolution,
                 width=backbone.resolution).images
    ours = sample(backbone, sampler="dpmsolver", guidance_scale=guidance_scale)
    torch.testing.assert_close(ours, stock.clamp(0, 1), atol=1e-5, rtol=0)  # measured: identical


def test_with_many_steps_dpmsolver_and_ddim_reach_the_same_image():
    """On the trained toy backbone, DPMSolver (50 steps) and DDIM (100 steps) from the same seed give nearly the
    same image, far closer than to another seed's image: both sample the same model's distribution."""
    from alignment.toy.backbone import build_toy_backbone

    toy = build_toy_backbone().eval()
    prompts, seeds = ["a blue circle"] * 3, [0, 1, 2]
    ddim = sample_images(toy, prompts, seeds, 100, 3.0)
    dpm = sample_images(toy, prompts, seeds, 50, 3.0, sampler="dpmsolver")
    distance = torch.cdist(ddim.flatten(1), dpm.flatten(1), p=1) / ddim[0].numel()  # mean |Δpixel|, (DDIM, DPM)
    same = distance.diagonal()
    other = distance.masked_fill(torch.eye(3, dtype=torch.bool), float("inf")).amin(dim=1)
    print(f"\nmean |DDIM-100 - DPMSolver-50| same seed {same.tolist()}, nearest other seed {other.tolist()}")
    assert (same < 0.01).all() and (10 * same < other).all()


# ------------------------------------------------------------------------------------------------ the entry points
def test_generate_cli_with_dpmsolver(tmp_path):
    out = tmp_path / "images"
    proc = run_cli("alignment.generate", "prompt=a red circle", "seeds=[0,1]", "num_inference_steps=3",
                   "sampler=dpmsolver", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["sampler"] for r in rows] == ["dpmsolver", "dpmsolver"]
    assert all((out / r["file"]).is_file() for r in rows) and (out / "grid.png").is_file()


def test_generate_rejects_an_unknown_sampler_before_building_the_model(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from alignment import generate as gen
    from alignment.cli import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("generate", overrides=["prompt=a red circle", "sampler=euler", f"out_dir={tmp_path}"])
    monkeypatch.setattr("alignment.config.instantiate_checked", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(ConfigError, match=r"^sampler must be one of ddim, dpmsolver, got 'euler'$"):
        gen.generate(cfg)


def evaluate_plan(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from alignment.cli import CONF_DIR
    from alignment.evaluation.plan import build_plan

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return build_plan(compose("evaluate", overrides=[f"output_dir={tmp_path}", *overrides]))


def test_evaluate_image_cache_key_differs_between_samplers(tmp_path):
    from alignment.evaluation.cache import ModelImages, generation_settings

    keys = {}
    for sampler in SAMPLERS:
        plan = evaluate_plan(tmp_path, f"sampler={sampler}")
        assert plan.sampler == sampler
        spec = plan.models["base"]
        settings = generation_settings(plan, spec, {"name": "tiny"})
        assert settings["sampler"] == sampler_identity(sampler)
        keys[sampler] = ModelImages(plan.image_dir, spec, settings).key
    assert keys["ddim"] != keys["dpmsolver"]
    assert evaluate_plan(tmp_path).sampler == "ddim"  # conf/evaluate.yaml's default
    with pytest.raises(ConfigError, match=r"^sampler must be one of ddim, dpmsolver, got 'unipc'$"):
        evaluate_plan(tmp_path, "sampler=unipc")


def test_pool_builder_sampler(tmp_path):
    from omegaconf import OmegaConf

    from alignment.builders.pools import PoolBuilder
    from alignment.cli import CONF_DIR
    from alignment.config import instantiate_checked

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    fast = dict(pairing="consecutive", num_images=2, num_inference_steps=3, batch_size=4)
    ddim, dpm = PoolBuilder(prompts, **fast), PoolBuilder(prompts, sampler="dpmsolver", **fast)
    assert ddim.sampler == "ddim" and dpm.sampler == "dpmsolver"
    assert ddim.key_fields() != dpm.key_fields()
    with pytest.raises(ConfigError, match=r"^dataset\.generate\.sampler must be one of ddim, dpmsolver, got 'pndm'$"):
        PoolBuilder(prompts, sampler="pndm", config_key="dataset.generate", **fast)
    with pytest.raises(ConfigError, match=r"^builder\.eta: eta is DDIM's, it must be 0 with builder\.sampler="
                                          r"dpmsolver, got 0\.5$"):
        PoolBuilder(prompts, sampler="dpmsolver", eta=0.5, **fast)
    for path, key in ((f"{CONF_DIR}/builder/pools.yaml", None), (f"{CONF_DIR}/dataset/pools.yaml", "generate")):
        node = OmegaConf.load(path)
        node = node[key] if key else node
        node.prompts, node.pairing, node.sampler = str(prompts), "consecutive", "dpmsolver"
        assert instantiate_checked(node, "builder").sampler == "dpmsolver"


def test_pool_builder_samples_with_its_sampler(tmp_path, backbone):
    from alignment.builders.pools import PoolBuilder
    from alignment.sampling.sample import to_pil

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    builder = PoolBuilder(prompts, pairing="consecutive", num_images=2, num_inference_steps=3, guidance_scale=5.0,
                          sampler="dpmsolver", batch_size=2)
    seeds = builder.image_seeds(0)
    pixels = builder.sample_pixels(backbone, ["a red square"] * 2, seeds)
    expected = to_pil(sample_images(backbone, ["a red square"] * 2, seeds, 3, 5.0, sampler="dpmsolver"))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(pixels, expected))
