"""Reward guidance, Focus-N-Fix's sampling-time baseline (alignment.sampling.reward_guidance;
docs/methods.md#reward-guidance-baseline), and its ``reward_guidance`` node in ``python -m alignment.generate``.

The sampler tests run on the pretrained toy backbone (32 px, 8 × 8 latents), DDIM 10 steps at CFG 1 (the toy
Focus-N-Fix setting), with the toy world's ``toy_safety`` (− pixels of blood and uncovered body) as the reward: six
butcher / nurse captions × seeds 1 and 2, of which six images carry a toxic region (the base mean is about −47).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from alignment import generate as gen
from alignment.errors import ConfigError
from alignment.sampling import reward_guidance as rg
from alignment.sampling.sample import predicted_clean, sample_images
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 10
PROMPTS = ["a photo of a light female butcher", "a photo of a medium female butcher",
           "a photo of a dark female butcher", "a photo of a tan female butcher", "a photo of a light male nurse",
           "a photo of a medium male nurse"]
SEEDS = [1, 2]
BATCH_PROMPTS = [p for p in PROMPTS for _ in SEEDS]
BATCH_SEEDS = [s for _ in PROMPTS for s in SEEDS]


@pytest.fixture(scope="module")
def toy():
    from alignment.toy.backbone import build_toy_backbone

    return build_toy_backbone().eval()


@pytest.fixture(scope="module")
def safety():
    from alignment.toy.scorers import ToySafety

    return ToySafety().freeze()


@pytest.fixture(scope="module")
def unguided(toy):
    return sample_images(toy, BATCH_PROMPTS, BATCH_SEEDS, num_inference_steps=STEPS, guidance_scale=1.0)


@pytest.fixture(scope="module")
def guided(toy, safety):
    """Plain reward guidance (M = 1), λ = 1, clip 1, through the UNet (the defaults)."""
    return rg.sample_with_reward_guidance(toy, BATCH_PROMPTS, BATCH_SEEDS, safety, scale=1.0, clip=1.0,
                                          num_inference_steps=STEPS, guidance_scale=1.0)


@pytest.fixture(scope="module")
def heat_masks(unguided, safety):
    """toy_safety's heatmap masks of the unguided images, cut as Focus-N-Fix cuts them."""
    from alignment.scorers.masks import build_mask_pipeline, problem_masks

    return problem_masks(safety, unguided, BATCH_PROMPTS, "heatmap",
                         build_mask_pipeline({}, "heatmap", "reward_guidance.mask_options"))


# ------------------------------------------------------------------------------------------------ the parts
def test_clip_and_latent_mask():
    grad = torch.zeros(3, 4, 2, 2)
    grad[0, 0, 0, 0] = 3.0                        # norm 3: clipped to 1
    grad[1, :, 0, 0] = 0.25                       # norm 0.5: unchanged
    clipped = rg.clip_per_sample(grad, 1.0)
    norms = torch.linalg.vector_norm(clipped.flatten(1), dim=1)
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(clipped[1], grad[1]) and torch.equal(rg.clip_per_sample(grad, None), grad)
    assert torch.allclose(clipped[0] / 1.0, grad[0] / 3.0)          # the direction is kept
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :8, :6] = 1                          # the first latent pixel whole, the second half (4 × 4 patches)
    small = rg.latent_mask(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8) and small[0, 0, 0, 0] == 1 and small[0, 0, 0, 1] == 0.5
    assert small[0, 0, 2:].sum() == 0 and math.isclose(float(small.mean()), float(mask.mean()))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_change_is_the_same_epsilon_change_for_epsilon_and_v_models(kind):
    """ε̂ = ε − λ sqrt(1 − ᾱ) g whichever quantity the model predicts; x̂_0 agrees between the two forms."""
    torch.manual_seed(0)
    x0, eps, g = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alpha_bar = torch.tensor(0.3)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = a * x0 + s * eps
    pred = eps if kind == "epsilon" else a * eps - s * x0
    assert torch.allclose(predicted_clean(kind, x_t, pred, alpha_bar), x0, atol=1e-5)
    new = rg.guided_output(pred, g, kind, alpha_bar, scale=2.0)
    new_eps = new if kind == "epsilon" else s * x_t + a * new      # ε from v: sqrt(1 − ᾱ) x_t + sqrt(ᾱ) v
    assert torch.allclose(new_eps, eps - 2.0 * s * g, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sampling
def test_guidance_raises_the_reward(toy, safety, unguided, guided):
    base, after = safety(unguided, BATCH_PROMPTS), safety(guided, BATCH_PROMPTS)
    assert base.mean() < -20 and (base < -5).sum() >= 4                  # there is something to fix
    assert after.mean() > 0.1 * base.mean()                               # ≥ 90 % of the toxic pixels gone
    assert (after >= base - 0.5).all()                                    # no image made clearly worse
    assert (after[base < -5] > 0.5 * base[base < -5]).all()               # each toxic image at least halved
    cheap = rg.sample_with_reward_guidance(toy, BATCH_PROMPTS, BATCH_SEEDS, safety, scale=1.0, clip=1.0,
                                           grad_through_unet=False, num_inference_steps=STEPS, guidance_scale=1.0)
    assert safety(cheap, BATCH_PROMPTS).mean() > 0.5 * base.mean()       # ε held constant: also up, less so


def test_masked_guidance_stays_closer_outside_the_mask(toy, safety, unguided, guided, heat_masks):
    masked = rg.sample_with_reward_guidance(toy, BATCH_PROMPTS, BATCH_SEEDS, safety, scale=1.0, clip=1.0,
                                            masks=heat_masks, num_inference_steps=STEPS, guidance_scale=1.0)
    outside = 1 - heat_masks
    has_mask = heat_masks.flatten(1).sum(1) > 0
    assert has_mask.sum() >= 4

    def change_outside(images):  # mean |Δpixel| over the pixels outside each image's mask
        return ((images - unguided).abs() * outside).flatten(1).sum(1) / (3 * outside.flatten(1).sum(1))

    plain, local = change_outside(guided)[has_mask], change_outside(masked)[has_mask]
    assert local.mean() < 0.95 * plain.mean(), (local, plain)
    # an image with an empty mask is not guided at all: exactly the unguided image
    assert torch.equal(masked[~has_mask], unguided[~has_mask])
    # and the masked form still removes most of the toxic pixels
    assert safety(masked, BATCH_PROMPTS).mean() > 0.2 * safety(unguided, BATCH_PROMPTS).mean()


@pytest.mark.parametrize("sampler, cfg", [("ddim", 1.0), ("ddim", 4.0), ("dpmsolver", 4.0)])
def test_scale_zero_is_sample_images(toy, safety, sampler, cfg):
    prompts, seeds = PROMPTS[:2], [3, 4]
    plain = sample_images(toy, prompts, seeds, num_inference_steps=4, guidance_scale=cfg, sampler=sampler)
    zero = rg.sample_with_reward_guidance(toy, prompts, seeds, safety, scale=0.0, clip=1.0, num_inference_steps=4,
                                          guidance_scale=cfg, sampler=sampler)
    assert torch.equal(plain, zero)


def test_an_empty_mask_changes_nothing_through_the_gradient_path(toy, safety):
    """M = 0 runs the whole gradient path (λ ≠ 0) and still gives ``sample_images``' pixels exactly."""
    prompts, seeds = PROMPTS[:2], [1, 2]
    plain = sample_images(toy, prompts, seeds, num_inference_steps=4, guidance_scale=3.0)
    empty = rg.sample_with_reward_guidance(toy, prompts, seeds, safety, scale=5.0, clip=None,
                                           masks=torch.zeros(2, 1, 32, 32), num_inference_steps=4,
                                           guidance_scale=3.0)
    assert torch.equal(plain, empty)


def test_a_reward_without_a_graph_gives_zero_gradient(toy):
    """A reward that ignores the pixels (a constant, or one computed off the graph) has no gradient: no change, the
    plain images exactly, through the UNet or not."""
    prompts, seeds = PROMPTS[:2], [1, 2]
    plain = sample_images(toy, prompts, seeds, num_inference_steps=3, guidance_scale=2.0)
    rewards = {"constant": lambda images, p: torch.full((len(p),), 3.0),
               "detached": lambda images, p: images.detach().mean(dim=(1, 2, 3))}
    for name, reward in rewards.items():
        for through_unet in (True, False):
            out = rg.sample_with_reward_guidance(toy, prompts, seeds, reward, scale=5.0, clip=None,
                                                 grad_through_unet=through_unet, num_inference_steps=3,
                                                 guidance_scale=2.0)
            assert torch.equal(out, plain), (name, through_unet)


def test_the_reward_is_the_shared_weighted_sum(safety):
    """Reward guidance's reward is ``method.reward``'s weighted sum (``alignment.objectives.draft.weighted_reward``)."""
    from alignment.objectives.draft import weighted_reward
    from alignment.toy.scorers import ToyContrast

    g = guidance(scorer="toy_safety - 0.5*toy_contrast")
    g.scorers = {"toy_safety": safety, "toy_contrast": ToyContrast().freeze()}
    images = torch.rand(2, 3, 32, 32)
    total, parts = weighted_reward(g.scorers, g.weights, images, PROMPTS[:2])
    assert torch.equal(g.reward(images, PROMPTS[:2]), total)
    assert torch.allclose(total, parts["toy_safety"] - 0.5 * parts["toy_contrast"])


# ------------------------------------------------------------------------------------------------ config
def guidance(**values):
    return rg.RewardGuidance.from_config(OmegaConf.create(values), None, 32)


def test_settings_and_off():
    assert rg.RewardGuidance.from_config(None) is None
    assert guidance(scorer=None, scale=1.0) is None
    g = guidance(scorer="toy_safety", scale=2, clip=None, mask="heatmap")
    assert g.settings() == {"scorer": "toy_safety", "scale": 2.0, "clip": None, "mask": "heatmap",
                            "grad_through_unet": True, "mask_scorer": "toy_safety", "mask_options": {}}
    assert g.weights == {"toy_safety": 1.0} and g.needs_unguided
    both = guidance(scorer="toy_safety + 0.5*toy_contrast", mask="saliency")
    assert both.weights == {"toy_safety": 1.0, "toy_contrast": 0.5} and both.mask_scorer is None


@pytest.mark.parametrize("values, message", [
    ({"scale": "abc"}, "reward_guidance.scale must be a finite number, got 'abc'"),
    ({"scale": float("nan")}, "reward_guidance.scale must be a finite number"),
    ({"clip": 0}, "reward_guidance.clip must be > 0, got 0"),
    ({"clip": -1.0}, "reward_guidance.clip must be > 0"),
    ({"mask": "blobs"}, "reward_guidance.mask: 'blobs' is neither a mask kind (heatmap, saliency)"),
    ({"mask": 3}, "reward_guidance.mask must be null, heatmap, saliency or the path"),
    ({"grad_through_unet": "yes"}, "reward_guidance.grad_through_unet must be true or false"),
    ({"scorer": "toy_contrast", "mask": "heatmap"},
     "reward_guidance.mask_scorer: reward_guidance.mask=heatmap needs a scorer with a heatmap, but 'toy_contrast'"),
    ({"mask": "heatmap", "mask_scorer": "toy_centring"}, "needs a scorer with a heatmap, but 'toy_centring'"),
    ({"scorer": "toy_safety + toy_artifacts", "mask": "heatmap"}, "with several reward scorers needs the name"),
    ({"scorer": "toxicity_judge"}, "reward_guidance.scorer: scorer 'toxicity_judge' (ToxicityJudge) is not "
                                   "differentiable"),
    ({"scorer": "no_such_scorer"}, "reward_guidance: unknown scorer 'no_such_scorer'"),
    ({"scorer": "toy"}, "reward_guidance: unknown scorer 'toy'"),                 # an ensemble file, not a scorer
    ({"scorer": "2*"}, "reward_guidance.scorer: cannot read"),
    ({"mask_scorer": "toy_safety"}, "reward_guidance.mask_scorer: only used with"),
    ({"mask": "heatmap", "mask_options": {"dilaton": 2}}, "reward_guidance.mask_options.dilaton: unknown key"),
    ({"mask": "heatmap", "mask_options": {"percentile": 120}}, "reward_guidance.mask_options.percentile must be"),
    ({"sclae": 1.0}, "reward_guidance.sclae: unknown key"),
])
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(ConfigError) as err:
        guidance(**{"scorer": "toy_safety", **values})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resolution_and_mask_folder_checks(tmp_path):
    with pytest.raises(ConfigError, match="scorers.toy_safety"):
        rg.RewardGuidance.from_config(OmegaConf.create({"scorer": "toy_safety"}), None, 48)
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.new("L", (32, 32), 255).save(folder / "00000_seed1.png")
    Image.new("L", (32, 32), 0).save(folder / "00001.png")
    g = guidance(scorer="toy_safety", mask=str(folder))
    g.check_mask_files(2, [1])
    with pytest.raises(ConfigError, match=r"has no mask for prompt 0 seed 2 \(expected 00000_seed2.png"):
        g.check_mask_files(2, [1, 2])
    masks = g.masks_from_files([0, 1], [1, 1], (32, 32))
    assert masks.shape == (2, 1, 32, 32) and masks[0].min() == 1 and masks[1].max() == 0


def run_main(monkeypatch, capsys, tmp_path, *overrides: str) -> str:
    """generate's Hydra entry point in-process: it must exit 2 with one ``error:`` line; the toy backbone points at
    missing weights, so an error about the guidance proves it came before any model loaded."""
    monkeypatch.setattr(sys, "argv", ["generate", f"hydra.run.dir={tmp_path / 'hydra'}", f"out_dir={tmp_path / 'out'}",
                                      "backbone=toy", f"backbone.weights={tmp_path / 'nowhere'}", "prompt=a red circle",
                                      *overrides])
    with pytest.raises(SystemExit) as exit_info:
        gen.main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()
             and not line.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_generate_checks_before_any_model_loads(monkeypatch, capsys, tmp_path):
    line = run_main(monkeypatch, capsys, tmp_path, "reward_guidance.scorer=toxicity_judge")
    assert line.startswith("error: reward_guidance.scorer: scorer 'toxicity_judge' (ToxicityJudge) is not "
                           "differentiable")
    line = run_main(monkeypatch, capsys, tmp_path, "reward_guidance.scorer=toy_safety", "reward_guidance.clip=0")
    assert line.startswith("error: reward_guidance.clip must be > 0")
    (tmp_path / "masks").mkdir()
    line = run_main(monkeypatch, capsys, tmp_path, "reward_guidance.scorer=toy_safety",
                    f"reward_guidance.mask={tmp_path / 'masks'}")
    assert line == f"error: reward_guidance.mask: {tmp_path / 'masks'} has no mask for prompt 0 seed 0 (expected " \
                   "00000_seed0.png or 00000.png)"
    line = run_main(monkeypatch, capsys, tmp_path, "reward_guidance.scorer=toy_safety", "sld.preset=max",
                    "guidance_scale=7.5")
    assert line.startswith("error: reward_guidance: not combined with Safe Latent Diffusion")
    # off: the backbone is reached (and fails on its missing weights)
    line = run_main(monkeypatch, capsys, tmp_path, "reward_guidance.clip=0")
    assert "no trained toy weights" in line
    # the reward's scorer loads before the backbone: its bad weights are the error, not the backbone's
    bad = tmp_path / "not_an_aesthetic_head.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    line = run_main(monkeypatch, capsys, tmp_path, "scorers=aesthetic", f"scorers.aesthetic.mlp_weights={bad}",
                    "reward_guidance.scorer=aesthetic")
    assert line.startswith("error: scorers.aesthetic.mlp_weights: not an aesthetic-predictor MLP"), line


def test_a_rerun_keeps_the_masks_it_was_given(tmp_path):
    """Masks of an earlier run in ``out_dir/masks`` are cleaned up, except those this run reads."""
    masks = tmp_path / "out" / gen.MASK_DIR
    names = ["00000_seed0.png", "00000_seed1.png"]

    def fill():
        masks.mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.new("L", (32, 32), 255).save(masks / name)

    def left():
        return sorted(p.name for p in masks.iterdir())

    fill()
    for given in (masks, masks / names[1], tmp_path / "out"):       # the folder, a file in it, a folder above it
        gen.remove_stale_masks(masks, guidance(scorer="toy_safety", mask=str(given)), {names[0]})
        assert left() == names, given
    other = tmp_path / "other.png"
    Image.new("L", (32, 32), 255).save(other)
    gen.remove_stale_masks(masks, guidance(scorer="toy_safety", mask=str(other)), {names[0]})
    assert left() == []                                               # masks given from elsewhere: all stale
    fill()
    gen.remove_stale_masks(masks, guidance(scorer="toy_safety", mask="heatmap"), {names[0]})
    assert left() == names[:1]                                        # made by this run: kept
    fill()
    gen.remove_stale_masks(masks, None, {names[0]})
    assert left() == []                                               # an unguided run: all stale


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_generate_with_reward_guidance_end_to_end(tmp_path, safety):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    common = ["backbone=toy", f"prompts={prompts}", "seeds=[1,2]", f"num_inference_steps={STEPS}",
              "guidance_scale=1.0", "device=cpu"]

    def generate(name, *extra):
        out = tmp_path / name
        proc = run_cli("alignment.generate", *common, f"out_dir={out}", f"hydra.run.dir={tmp_path / (name + '_h')}",
                       *extra, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        images = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(out / r["file"]).convert(
            "RGB"), dtype="float32") / 255).permute(2, 0, 1) for r in rows])
        return out, rows, images, proc.stdout

    _, plain_rows, plain, _ = generate("plain")
    assert all(r["reward_guidance"] is None and "mask_fraction" not in r for r in plain_rows)
    out, rows, guided, stdout = generate("guided", "reward_guidance.scorer=toy_safety", "reward_guidance.mask=heatmap")
    assert "with reward guidance (reward toy_safety, scale 1, clip 1.0, mask heatmap)" in stdout
    assert [r["file"] for r in rows] == [r["file"] for r in plain_rows]
    assert rows[0]["reward_guidance"] == {"scorer": "toy_safety", "scale": 1.0, "clip": 1.0, "mask": "heatmap",
                                          "grad_through_unet": True, "mask_scorer": "toy_safety",
                                          "mask_options": {}}
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(r["file"] for r in rows)
    assert any(r["mask_fraction"] > 0 for r in rows)
    prompts_per_image = [r["prompt"] for r in rows]
    before, after = safety(plain, prompts_per_image), safety(guided, prompts_per_image)
    assert before.mean() < -20 and after.mean() > 0.2 * before.mean(), (before, after)
    # images whose mask is empty are the plain images (8-bit files: exactly equal)
    empty = torch.tensor([r["mask_fraction"] == 0 for r in rows])
    assert empty.any() and torch.equal(guided[empty], plain[empty])
    # the masks written are read back by a given-mask run: the same images
    again, again_rows, regiven, _ = generate("given", "reward_guidance.scorer=toy_safety",
                                             f"reward_guidance.mask={out / 'masks'}")
    assert again_rows[0]["reward_guidance"]["mask"] == str(out / "masks")
    assert (regiven - guided).abs().max() < 2 / 255
    # a rerun into the same folder, given its own masks, reads them and keeps them
    written = sorted(p.name for p in (out / "masks").iterdir())
    _, rerun_rows, rerun, _ = generate("guided", "reward_guidance.scorer=toy_safety",
                                       f"reward_guidance.mask={out / 'masks'}")
    assert sorted(p.name for p in (out / "masks").iterdir()) == written
    assert (rerun - guided).abs().max() < 2 / 255
