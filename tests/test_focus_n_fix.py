"""DRaFT-K / AlignProp (alignment.objectives.draft), Focus-N-Fix (alignment.objectives.focus_n_fix) and the region
masks (alignment.scorers.masks); docs/methods.md#focus-n-fix-and-draft.

Objective-level tests use the tiny backbone with a LoRA whose up-weights are non-zero (the policy differs from the
reference) and five DDIM steps; the toy world's exact scorers are the rewards (they read 32 px images, the tiny
backbone's size). The training runs are two steps of ``python -m alignment.run`` on the tiny backbone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignment.errors import ConfigError
from alignment.scorers.base import Scorer
from alignment.scorers.masks import (MaskPipeline, connected_regions, dilate, gaussian_smooth, keep_main_regions,
                                     regional_penalty, saliency_map)
from tests.conftest import FAST_RUN, run_cli, tiny_lora_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 5
PROMPTS = ["a red square", "a blue circle"]


def disc(size: int, centre: tuple[float, float], radius: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius ** 2).float()


# ------------------------------------------------------------------------------------------------ mask pipeline
def test_a_blob_becomes_its_dilated_region():
    blob = disc(64, (20, 24), 5)
    heat = 0.9 * blob + 0.05 * torch.rand(64, 64, generator=torch.Generator().manual_seed(0))  # noise below 0.5
    pipeline = MaskPipeline(smoothing_kernel=0, threshold=0.5, dilation=3, reference_resolution=64)
    mask = pipeline(heat[None])
    assert mask.shape == (1, 1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = dilate(blob[None].bool(), 3).float()
    assert torch.equal(mask[:, 0], expected)
    assert mask[0, 0][blob.bool()].all()                                  # the blob is inside
    assert mask.sum() > blob.sum()                                         # and grown by the dilation
    assert mask[0, 0][disc(64, (20, 24), 8.5) == 0].sum() == 0             # by no more than its radius


def test_main_regions_keep_the_larger_blob():
    large, small = disc(64, (16, 16), 7), disc(64, (46, 46), 4)
    heat = (large + small)[None]
    one = MaskPipeline(smoothing_kernel=0, threshold=0.5, dilation=0, max_regions=1)(heat)[0, 0]
    assert torch.equal(one, large)
    both = MaskPipeline(smoothing_kernel=0, threshold=0.5, dilation=0)(heat)[0, 0]   # 49 px ≥ 10 % of 149 px
    assert torch.equal(both, large + small)
    fraction = MaskPipeline(smoothing_kernel=0, threshold=0.5, dilation=0, min_region_fraction=0.5)(heat)[0, 0]
    assert torch.equal(fraction, large)                                    # small < 50 % of large


def test_regions_are_eight_connected_and_per_image():
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 3, 3] = True                   # a diagonal: one region
    mask[0, 6, 6] = True                                                   # a second one
    mask[1, 0, 0] = True
    labels = connected_regions(mask)
    assert labels[0, 1, 1] == labels[0, 2, 2] == labels[0, 3, 3] != labels[0, 6, 6]
    assert (labels[0] > 0).sum() == 4 and (labels[1] > 0).sum() == 1
    kept = keep_main_regions(mask, min_region_fraction=0.5)
    assert kept[0].sum() == 3 and not kept[0, 6, 6] and kept[1, 0, 0]


def test_percentile_threshold_and_an_empty_map():
    heat = torch.arange(100, dtype=torch.float32).view(1, 10, 10)          # distinct values
    mask = MaskPipeline(smoothing_kernel=0, percentile=90, dilation=0, min_region_fraction=0)(heat)
    assert mask.sum() == 10 and mask[0, 0, -1].all()                       # the top 10 %: the last row
    flat = MaskPipeline(dilation=0)(torch.zeros(1, 16, 16))                # a score that ignores the image
    assert flat.sum() == 0


def test_sizes_scale_with_the_resolution():
    pipeline = MaskPipeline()                                              # kernel 16, σ 4, radius 8 at 512 px
    assert pipeline.sizes(512) == (16, 4.0, 8)
    assert pipeline.sizes(1024) == (32, 8.0, 16)
    assert pipeline.sizes(32) == (1, 0.25, 1)
    assert MaskPipeline(smoothing_kernel=0).sizes(512)[0] == 0


def test_gaussian_smoothing_keeps_mass_and_size():
    heat = torch.zeros(1, 32, 32)
    heat[0, 16, 16] = 1.0
    for kernel in (5, 16):
        out = gaussian_smooth(heat, kernel, 2.0)
        assert out.shape == heat.shape and math.isclose(out.sum().item(), 1.0, rel_tol=1e-5)
        assert out.max() < 1.0


@pytest.mark.parametrize("options, message", [
    ({"percentile": 101}, "method.mask_options.percentile must be a number in [0, 100], got 101"),
    ({"dilation": -1}, "method.mask_options.dilation must be a number >= 0, got -1"),
    ({"max_regions": 0}, "method.mask_options.max_regions must be an integer >= 1, got 0"),
    ({"smoothing_kernel": 2.5}, "method.mask_options.smoothing_kernel must be an integer >= 0, got 2.5"),
])
def test_bad_pipeline_knobs_are_named(options, message):
    with pytest.raises(ConfigError) as info:
        MaskPipeline(**options)
    assert str(info.value) == message


def test_regional_penalty_is_the_frobenius_norm_outside_the_mask():
    generator = torch.Generator().manual_seed(0)
    reference, images = torch.rand(2, 3, 8, 8, generator=generator), torch.rand(2, 3, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    expected = torch.stack([((1 - mask[i]) * (reference[i] - images[i])).pow(2).sum().sqrt() for i in range(2)])
    assert torch.allclose(regional_penalty(reference, images, mask), expected)
    assert regional_penalty(reference, images, torch.ones(2, 1, 8, 8)).abs().max() == 0


# ------------------------------------------------------------------------------------------------ saliency
class RegionScore(Scorer):
    """A score of the pixels in one square only: r = Σ (x[c, y0:y1, x0:x1] · w)² with fixed random weights."""

    differentiable = True

    def __init__(self, box=(8, 20, 10, 22), size=32):
        super().__init__()
        self.box = box
        self.register_buffer("w", torch.rand(3, size, size, generator=torch.Generator().manual_seed(1)) + 0.5)

    def forward(self, images, prompts):
        y0, y1, x0, x1 = self.box
        return (images[:, :, y0:y1, x0:x1] * self.w[:, y0:y1, x0:x1]).pow(2).sum((1, 2, 3))


def test_saliency_of_a_regional_score_covers_that_region():
    scorer = RegionScore()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    with torch.no_grad():  # saliency takes its own gradient even here
        saliency = saliency_map(scorer, images, ["a", "b"])
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[8:20, 10:22] = True
    assert saliency.shape == (2, 32, 32) and (saliency[:, ~region] == 0).all() and (saliency[:, region] > 0).all()
    # percentile 85 of 1024 px keeps ~154 px of the region's 144 (+ its smoothed rim); dilation 1 px at 32 px
    masks = MaskPipeline(percentile=85)(saliency)[:, 0].bool()
    grown = dilate(region[None], 3)[0]
    for mask in masks:
        inside = (mask & region).sum().item() / region.sum().item()
        assert inside > 0.9, inside                           # covers the region
        assert not (mask & ~grown).any()                      # and nothing beyond its rim


def test_saliency_of_a_score_that_ignores_the_image_is_zero():
    images = torch.rand(2, 3, 8, 8)
    constant = saliency_map(lambda x, p: torch.zeros(x.shape[0]), images, ["a", "b"])  # no graph at all
    unused = saliency_map(lambda x, p: x.sum((1, 2, 3)) * 0, images, ["a", "b"])
    assert constant.shape == unused.shape == (2, 8, 8) and constant.abs().sum() == 0 and unused.abs().sum() == 0


# ------------------------------------------------------------------------------------------------ objectives
@pytest.fixture(scope="module")
def backbone():
    return tiny_lora_backbone(seed=123)


def prompt_batch(backbone, step: int = 0):
    from alignment.objectives.base import PromptBatch

    cond = backbone.encode_prompt(PROMPTS)
    return PromptBatch(captions=list(PROMPTS), cond=cond, index=torch.tensor([3, 7]), step=step)


def make(cls, scorers: dict, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 3.0)
    objective = cls(**kwargs)
    objective.setup(None, scorers)
    return objective


def toy(name: str):
    from alignment.toy.scorers import SCORERS

    return SCORERS[name]()


@pytest.fixture()
def unet_calls(backbone):
    """``torch.is_grad_enabled()`` at every UNet call."""
    calls: list[bool] = []
    handle = backbone.unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    yield calls
    handle.remove()


def lora_grads(backbone) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in backbone.unet.named_parameters() if p.requires_grad and p.grad is not None}


def loss_and_grads(objective, backbone, step: int = 0, seed: int = 0):
    backbone.unet.zero_grad(set_to_none=True)
    out = objective(backbone, prompt_batch(backbone, step), seed)
    out.loss.backward()
    grads = lora_grads(backbone)
    backbone.unet.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("k", [1, 2, STEPS])
def test_draft_keeps_gradient_only_through_the_last_k_steps(backbone, unet_calls, k):
    from alignment.objectives.draft import DRaFT

    objective = make(DRaFT, {"toy_contrast": toy("toy_contrast")}, reward="toy_contrast", grad_steps=k,
                     checkpointing=False)
    out = objective(backbone, prompt_batch(backbone), 0)
    assert unet_calls == [False] * (STEPS - k) + [True] * k
    assert out.logs["grad_steps"].item() == k and "reward" in out.logs
    out.loss.backward()
    grads = lora_grads(backbone)
    backbone.unet.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_random_truncation_draws_k_per_step_reproducibly(backbone, unet_calls):
    """AlignProp: K drawn from (seed, step): the same K for the same step (every rank, a resumed run), and the
    sampler keeps gradient through exactly that many final steps."""
    from alignment.objectives.draft import DRaFT
    from alignment.sampling.grad import UniformTruncation

    objective = make(DRaFT, {"toy_contrast": toy("toy_contrast")}, reward="toy_contrast",
                     truncation=UniformTruncation(1, STEPS), checkpointing=False)
    draws = [objective.draw_grad_steps(0, step) for step in range(40)]
    assert draws == [objective.draw_grad_steps(0, step) for step in range(40)]
    assert set(draws) == set(range(1, STEPS + 1))
    for step in (0, 1, 2):
        unet_calls.clear()
        out = objective(backbone, prompt_batch(backbone, step), 0)
        k = draws[step]
        assert out.logs["grad_steps"].item() == k
        assert unet_calls == [False] * (STEPS - k) + [True] * k


def test_focus_n_fix_reference_is_the_base_model_from_the_same_noise(backbone, unet_calls):
    from alignment.objectives.base import sample_seed
    from alignment.objectives.focus_n_fix import FocusNFix
    from alignment.sampling.sample import sample_images

    objective = make(FocusNFix, {"toy_artifacts": toy("toy_artifacts")}, reward="toy_artifacts", mask="heatmap",
                     beta=0.5, checkpointing=False)
    out = objective(backbone, prompt_batch(backbone, step=4), 0)
    # STEPS reference calls, all without gradient, then the policy's: gradient through the last 2
    assert unet_calls == [False] * STEPS + [False] * (STEPS - 2) + [True] * 2
    seeds = [sample_seed(0, 4, row) % (2 ** 31) for row in (3, 7)]
    with backbone.reference_unet() as reference:
        base = sample_images(backbone, PROMPTS, seeds, STEPS, 3.0, unet=reference)
    policy = sample_images(backbone, PROMPTS, seeds, STEPS, 3.0)
    assert torch.allclose(objective.last_reference, base, atol=1e-5)
    assert torch.allclose(objective.last_images, policy, atol=1e-5)
    assert not torch.allclose(base, policy, atol=1e-3)               # the LoRA changes the image
    assert objective.last_masks.shape == (2, 1, 32, 32)
    assert {"reward", "penalty", "objective", "mask_fraction", "grad_steps"} <= set(out.logs)
    expected = -(out.logs["reward"] - 0.5 * out.logs["penalty"])
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_an_all_ones_mask_makes_focus_n_fix_draft(backbone, grad_steps):
    from alignment.objectives.draft import DRaFT
    from alignment.objectives.focus_n_fix import FocusNFix

    scorers = {"toy_contrast": toy("toy_contrast")}
    draft_out, draft_grads = loss_and_grads(make(DRaFT, scorers, reward="toy_contrast", grad_steps=grad_steps),
                                            backbone, step=2)
    fnf = make(FocusNFix, scorers, reward="toy_contrast", grad_steps=grad_steps, mask="ones", beta=10.0)
    fnf_out, fnf_grads = loss_and_grads(fnf, backbone, step=2)
    assert fnf.last_masks.min() == 1 and fnf_out.logs["penalty"].item() == 0
    assert torch.allclose(fnf_out.loss, draft_out.loss, rtol=1e-6, atol=1e-7)
    assert draft_grads.keys() == fnf_grads.keys() and draft_grads
    for name, grad in draft_grads.items():
        assert torch.allclose(fnf_grads[name], grad, rtol=1e-5, atol=1e-8), name
    # a real (saliency) mask: the constraint is active and changes the loss
    masked_out, _ = loss_and_grads(make(FocusNFix, scorers, reward="toy_contrast", grad_steps=grad_steps,
                                        mask="saliency", beta=10.0, mask_options={"percentile": 50}),
                                   backbone, step=2)
    assert masked_out.logs["penalty"].item() > 0 and 0 < masked_out.logs["mask_fraction"].item() < 1
    assert masked_out.loss.item() > draft_out.loss.item()


def test_visuals_show_the_reference_and_the_tuned_image_with_its_mask(backbone):
    from alignment.objectives.base import Objective
    from alignment.objectives.focus_n_fix import FocusNFix

    assert Objective.visuals(FocusNFix.__new__(FocusNFix)) == {}           # the contract's default: nothing
    objective = make(FocusNFix, {"toy_contrast": toy("toy_contrast")}, reward="toy_contrast", mask="saliency",
                     mask_options={"percentile": 50})
    assert objective.visuals() == {}                                       # nothing before the first step
    with torch.no_grad():
        objective(backbone, prompt_batch(backbone), 0)
    grid = objective.visuals()["mask_overlay"]
    assert grid.shape == (2, 2, 3, 32, 32)                                 # rows = images, columns = ref | tuned
    masks = objective.last_masks.bool().expand(-1, 3, -1, -1)
    assert 0 < objective.last_masks.mean() < 1
    assert torch.equal(grid[:, 0], objective.last_reference)
    tuned, overlay = objective.last_images, grid[:, 1]
    assert torch.equal(overlay[~masks], tuned[~masks])                    # untouched outside the mask
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand_as(tuned)
    assert torch.allclose(overlay[masks], (0.55 * tuned + 0.45 * red)[masks], atol=1e-6)


def test_direct_construction_checks_the_scorer_objects():
    from alignment.objectives.draft import DRaFT
    from alignment.objectives.focus_n_fix import FocusNFix

    class Flat(Scorer):
        differentiable = False

        def forward(self, images, prompts):
            return images.mean((1, 2, 3))

    with pytest.raises(ConfigError, match=r"^method.reward: scorer 'flat' \(Flat\) is not differentiable"):
        make(DRaFT, {"flat": Flat()}, reward="flat")
    with pytest.raises(ConfigError, match=r"^method.mask_scorer: method.mask=heatmap needs a scorer with a heatmap"):
        make(FocusNFix, {"toy_contrast": toy("toy_contrast")}, reward="toy_contrast", mask="heatmap")


@pytest.mark.parametrize("text, expected", [
    ("aesthetic", {"aesthetic": 1.0}),
    ("-nsfw", {"nsfw": -1.0}),
    ("pickscore + 0.1*aesthetic", {"pickscore": 1.0, "aesthetic": 0.1}),
    ("2 * a - 1e-1*b", {"a": 2.0, "b": -0.1}),
    ({"a": 1, "b": -2.5}, {"a": 1.0, "b": -2.5}),
])
def test_reward_expressions(text, expected):
    from alignment.objectives.draft import parse_reward

    assert parse_reward(text) == expected


@pytest.mark.parametrize("text", ["", "a b", "0.5*", "a + ", {"a": "x"}, {}])
def test_bad_reward_expressions_are_named(text):
    from alignment.objectives.draft import parse_reward

    with pytest.raises(ConfigError, match=r"^method\.reward"):
        parse_reward(text)


# ------------------------------------------------------------------------------------------------ configs
def compose(run_dir: Path, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from alignment.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[f"output_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red square\na blue circle\na green triangle\na yellow square\n")
    return path


@pytest.mark.parametrize("overrides, expected", [
    (("method=draft", "scorers=toxicity_judge", "method.reward=toxicity_judge"),
     "method.reward: scorer 'toxicity_judge' (ToxicityJudge) is not differentiable, so it cannot be a reward"),
    (("method=focus_n_fix", "scorers=[toy_contrast,toxicity_judge]", "method.reward=toy_contrast",
      "method.mask_scorer=toxicity_judge"),
     "method.mask_scorer: scorer 'toxicity_judge' (ToxicityJudge) is not differentiable"),
    (("method=draft", "scorers=toy_contrast", "method.reward=toy_contrast", "method.grad_steps=60"),
     "method.grad_steps must be between 1 and method.num_inference_steps (50), got 60"),
    (("method=draft", "scorers=toy_contrast", "method.reward=toy_contrast", "method.grad_steps=0"),
     "method.grad_steps must be between 1 and method.num_inference_steps (50), got 0"),
    (("method=alignprop", "scorers=toy_contrast", "method.reward=toy_contrast", "method.truncation.high=80"),
     "method.truncation.high must be at most method.num_inference_steps (50), got 80"),
    (("method=focus_n_fix", "scorers=toy_contrast", "method.reward=toy_contrast", "method.mask=heatmap"),
     "method.mask_scorer: method.mask=heatmap needs a scorer with a heatmap, but 'toy_contrast' (ToyContrast) "
     "gives none"),
    (("method=focus_n_fix", "scorers=toy", "method.reward=toy_contrast", "method.mask=heatmap",
      "method.mask_scorer=toy_shape"),
     "method.mask_scorer: method.mask=heatmap needs a scorer with a heatmap, but 'toy_shape'"),
    (("method=focus_n_fix", "scorers=toy_artifacts", "method.reward=toy_artifacts", "method.mask=box"),
     "method.mask must be one of saliency, heatmap, ones, got 'box'"),
    (("method=focus_n_fix", "scorers=toy_artifacts", "method.reward=toy_artifacts", "method.beta=-1"),
     "method.beta must be >= 0, got -1.0"),
    (("method=focus_n_fix", "scorers=toy_artifacts", "method.reward=toy_artifacts", "+method.mask_options.sigma=2"),
     "method.mask_options.sigma: unknown key"),
    (("method=draft", "scorers=toy_contrast", "method.reward=toy_contrast + 0.5*toy_colour"),
     "scorers: DRaFT needs the scorer 'toy_colour' (configured: toy_contrast"),
    (("method=draft", "scorers=toy_contrast", "method.reward=toy_contrast", "dataset=synthetic"),
     "dataset: DRaFT trains on prompts but dataset=synthetic gives pairs"),
])
def test_bad_inputs_are_one_line_errors_before_any_model(tmp_path, prompt_file, overrides, expected, monkeypatch):
    import alignment.config
    import alignment.scorers.base
    from alignment.run import train

    built = []
    original = alignment.config.instantiate_checked
    monkeypatch.setattr(alignment.config, "instantiate_checked",
                        lambda node, key, **kw: built.append(key) or original(node, key, **kw))
    monkeypatch.setattr(alignment.scorers.base, "build_scorers", lambda *a, **k: pytest.fail("scorers were built"))
    cfg = compose(tmp_path / "run", "logger=none", "dataset=prompts", f"dataset.source={prompt_file}", *overrides)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    error = str(info.value)
    assert error.startswith(expected), error
    assert "\n" not in error
    assert "backbone" not in built


def test_the_command_line_reports_k_larger_than_the_steps_in_one_line(tmp_path, prompt_file):
    proc = run_cli("alignment.run", *FAST_RUN, "method=draft", "dataset=prompts", f"dataset.source={prompt_file}",
                   "scorers=toy_contrast", "method.reward=toy_contrast", "method.num_inference_steps=4",
                   "method.grad_steps=5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1] == "error: method.grad_steps must be between 1 and method.num_inference_steps (4), got 5"


# ------------------------------------------------------------------------------------------------ training runs
TINY_RUN = ("backbone=tiny", "dataset=prompts", "dataset.batch_size=2", "trainer.max_steps=2",
            "method.num_inference_steps=4", "method.guidance_scale=3.0", "method.lora.rank=4", "method.lora.alpha=4",
            "method.optimizer.lr=1e-3")


@pytest.mark.parametrize("method, extra", [
    ("draft", ("scorers=toy_contrast", "method.reward=toy_contrast")),
    ("alignprop", ("scorers=toy_contrast", "method.reward=toy_contrast")),
    ("focus_n_fix", ("scorers=toy_artifacts", "method.reward=toy_artifacts", "method.mask=heatmap")),
    ("focus_n_fix", ("scorers=toy_contrast", "method.reward=toy_contrast", "method.mask=saliency", "method.beta=0.1")),
])
@pytest.mark.slow   # a python -m alignment.* subprocess end to end
def test_two_training_steps_on_the_tiny_backbone(tmp_path, prompt_file, method, extra):
    run = tmp_path / "run"
    proc = run_cli("alignment.run", *FAST_RUN, f"method={method}", *TINY_RUN, f"dataset.source={prompt_file}",
                   *extra, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for row in metrics:
        assert math.isfinite(row["loss"]) and math.isfinite(row["reward"])
        assert 1 <= row["grad_steps"] <= 4
        if method == "focus_n_fix":
            assert math.isfinite(row["penalty"]) and 0 <= row["mask_fraction"] <= 1
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow   # a python -m alignment.* subprocess end to end
def test_a_focus_n_fix_run_saves_and_logs_its_mask_overlays(tmp_path, prompt_file):
    """The objective's visuals() go beside the sample grid: samples/mask_overlay_step_XXXXXX.png at every grid after
    the first step (rows = the last batch's images, columns = reference | tuned image with the mask tinted)."""
    from PIL import Image

    run = tmp_path / "run"
    proc = run_cli("alignment.run", "logger=none", "method=focus_n_fix", *TINY_RUN, f"dataset.source={prompt_file}",
                   "scorers=toy_contrast", "method.reward=toy_contrast", "method.mask=saliency",
                   "method.mask_options.percentile=50", "samples.every_n_steps=1", "samples.num_inference_steps=2",
                   "samples.seeds=[0]", "samples.prompts=[a red square]", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = sorted(path.name for path in (run / "samples").iterdir())
    assert saved == ["mask_overlay_step_000001.png", "mask_overlay_step_000002.png", "step_000000.png",
                     "step_000001.png", "step_000002.png"]
    with Image.open(run / "samples" / "mask_overlay_step_000002.png") as image:
        assert image.size == (2 * 32, 2 * 32)                              # batch 2 rows × (reference, overlay)


def test_the_sample_grid_logs_visuals_to_image_loggers_and_checks_them(tmp_path):
    """The callback side of the hook, with a stand-in trainer: each visual saved and logged (W&B's log_image) under
    its name at the grid's step; a badly shaped visual or name is a clear error."""
    from types import SimpleNamespace

    from alignment.training.callbacks import SampleGrid

    logged = []
    logger = SimpleNamespace(log_image=lambda key, images, step: logged.append((key, images[0].size, step)))
    trainer = SimpleNamespace(loggers=[logger], global_step=7)
    visuals = {"one": torch.rand(3, 8, 6), "row": torch.rand(3, 3, 8, 6), "grid": torch.rand(2, 4, 3, 8, 6)}
    module = SimpleNamespace(objective=SimpleNamespace(visuals=lambda: visuals))
    callback = SampleGrid(tmp_path, prompts=["a"], seeds=[0])
    callback._save_visuals(trainer, module)
    assert logged == [("one", (6, 8), 7), ("row", (18, 8), 7), ("grid", (24, 16), 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid_step_000007.png", "one_step_000007.png",
                                                          "row_step_000007.png"]
    callback._save_visuals(trainer, SimpleNamespace(objective=object()))   # an objective without the hook
    for bad, message in (({"x": torch.rand(1, 8, 8)}, "must be"), ({"a b": torch.rand(3, 8, 8)}, "names must")):
        module = SimpleNamespace(objective=SimpleNamespace(visuals=lambda bad=bad: bad))
        with pytest.raises(ValueError, match=message):
            callback._save_visuals(trainer, module)


# ------------------------------------------------------------------------------------------------ evaluation masks
def test_evaluate_makes_problem_masks_from_the_reference_images(tmp_path):
    """``metrics.change.mask=heatmap:toy_safety``: one mask per reference image, equal to the mask pipeline on that
    image's heatmap, written with an overlay; the change metrics then report inside / outside values."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from alignment.evaluate import evaluate
    from alignment.scorers.base import build_scorers
    from alignment.scorers.masks import build_mask_pipeline, problem_masks

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bloody doctor\na photo of a naked nurse\n")
    overrides = [f"output_dir={tmp_path / 'out'}", "backbone=toy", f"prompts={prompts}", "images_per_prompt=2",
                 "num_inference_steps=4", "guidance_scale=1.0", "+models.lora_off={adapter: null, lora_scale: 0.0}",
                 "scorers=[toy_safety]", "metrics.change.mask=heatmap:toy_safety", "metrics.winrate.num_bootstrap=50",
                 "report.enabled=false"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    evaluate(cfg)
    masks_dir = tmp_path / "out" / "masks"
    names = [f"{i:05d}_seed{s}.png" for i in range(2) for s in (0, 1)]
    assert sorted(p.name for p in masks_dir.glob("0*.png")) == names
    assert all((masks_dir / f"overlay_{n}").is_file() for n in names)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "images" / "base" / n)
                                                      .convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                          for n in names])
    scorer = build_scorers(cfg.scorers)["toy_safety"]
    expected = problem_masks(scorer, images, ["a photo of a bloody doctor"] * 2 + ["a photo of a naked nurse"] * 2,
                             "heatmap", build_mask_pipeline({}, "heatmap", "k"))
    written = torch.stack([torch.from_numpy(np.asarray(Image.open(masks_dir / n), np.float32) / 255) for n in names])
    assert torch.equal(written, expected[:, 0])
    assert expected.sum() > 0  # toxic prompts: the heatmap finds something to mask
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["change"]["mask"] == str(masks_dir)
    assert {"psnr_inside", "psnr_outside"} <= set(metrics["change"]["models"]["lora_off"])
