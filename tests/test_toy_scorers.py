"""Toy-world scorers: matched renders far above mismatched ones and noise, heatmaps on the truth, gradients, configs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from alignment.cli import CONF_DIR
from alignment.toy import world as W
from alignment.toy.corpus import generate_corpus
from alignment.toy.scorers import (SHAPE_CLASSES, ToyArtifacts, ToyAttributeClassifier, ToyCentring, ToyColour,
                                   ToyContrast, ToyPreference, ToySafety, ToyShape, ToyToxicityJudge)

OBJECTS = [W.object_caption(c, s) for c in W.COLOURS for s in W.SHAPES]
FIGURES = [W.figure_caption(p) for p in W.PROFESSIONS]


def renders(captions, seeds=2, world=W.CLEAN_WORLD):
    outs = [W.render_caption(c, seed, world) for c in captions for seed in range(seeds)]
    return W.to_tensor([o.image for o in outs]), [c for c in captions for _ in range(seeds)], outs


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, W.SIZE, W.SIZE, generator=torch.Generator().manual_seed(seed))


def other_colour(caption: str) -> str:
    spec = W.parse_caption(caption)
    names = list(W.COLOURS)
    wrong = names[(names.index(spec.colour) + 1) % len(names)]
    if spec.kind == "object":
        return W.object_caption(wrong, spec.shape)
    return W.figure_caption({v: k for k, v in W.PROFESSIONS.items()}[wrong])


def other_shape(caption: str) -> str:
    spec = W.parse_caption(caption)
    if spec.kind == "figure":
        return W.object_caption(spec.colour, "circle")
    return W.object_caption(spec.colour, W.SHAPES[(W.SHAPES.index(spec.shape) + 1) % len(W.SHAPES)])


@pytest.fixture(scope="module")
def flawed():
    """A corpus sample with its truth (blood, nudity, artifacts at the planted rates)."""
    return generate_corpus(1500, seed=11)


def test_colour_matched_far_above_mismatched_and_noise():
    scorer = ToyColour()
    x, prompts, _ = renders(OBJECTS + FIGURES)
    matched = scorer.score(x, prompts)
    mismatched = scorer.score(x, [other_colour(p) for p in prompts])
    noise = scorer.score(noise_images(len(prompts)), prompts)
    assert matched.min() > 0.75 and mismatched.max() < 0.05 and noise.max() < 0.2
    assert scorer.predicted_colour(x, prompts) == [W.parse_caption(p).colour for p in prompts]


def test_shape_matched_far_above_mismatched_and_noise():
    scorer = ToyShape()
    x, prompts, _ = renders(OBJECTS + FIGURES)
    matched = scorer.score(x, prompts)
    mismatched = scorer.score(x, [other_shape(p) for p in prompts])
    noise = scorer.score(noise_images(len(prompts)), prompts)
    assert matched.mean() > -0.1 and matched.min() > -1.0
    assert mismatched.max() < -5 and noise.mean() < matched.mean() - 5
    assert scorer.predicted_shape(x) == [W.parse_caption(p).shape for p in prompts]
    assert set(SHAPE_CLASSES) == {*W.SHAPES, "figure"}


def test_shape_classifier_survives_flaws_and_blur(flawed):
    scorer = ToyShape()
    x = flawed.pixels()
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    truth = [s["shape"] for s in flawed.scenes]
    for images, bar in ((x, 0.9), (blurred, 0.85)):
        accuracy = np.mean([p == t for p, t in zip(scorer.predicted_shape(images), truth)])
        assert accuracy > bar, accuracy


def test_centring_and_contrast():
    centring, contrast = ToyCentring(), ToyContrast()
    x, prompts, outs = renders(OBJECTS, seeds=3)
    off, _, off_outs = renders(OBJECTS, seeds=3, world=W.WorldConfig(off_centre=1.0, p_artifact=0, p_blood_base=0))
    centred = centring.score(x, prompts)
    off_score = centring.score(off, prompts)
    assert centred.mean() > -2.5 and off_score.mean() < centred.mean() - 1.5
    # it measures the distance (within 0.8 px of the truth: rims of partial coverage count as foreground)
    for images, outputs in ((x, outs), (off, off_outs)):
        far = [np.hypot(o.scene.cx - 16, o.scene.cy - 16) for o in outputs]
        assert np.allclose(-centring.score(images, prompts).numpy(), far, atol=0.8)
    flat = torch.full((4, 3, W.SIZE, W.SIZE), 0.84)
    values = contrast.score(x, prompts)
    # yellow is nearly as bright as the background: low contrast by design (a planted colour/contrast trade-off)
    yellow = torch.tensor(["yellow" in p for p in prompts])
    assert values[~yellow].min() > 8 and values[yellow].max() < 5 and values.min() > 0.3
    assert contrast.score(flat, prompts[:4]).max() < 1e-3
    half = contrast.score(0.84 + 0.5 * (x - 0.84), prompts)  # contrast halved -> score halved
    assert torch.allclose(half, values / 2, rtol=0.02)


def test_scorers_have_different_scales():
    x, prompts, _ = renders(OBJECTS)
    means = {s.name: float(s.score(x, prompts).mean()) for s in (ToyColour(), ToyShape(), ToyCentring(),
                                                                 ToyContrast())}
    assert 0.75 < means["toy_colour"] <= 1 and -1 < means["toy_shape"] <= 0
    assert -3 < means["toy_centring"] <= 0 and means["toy_contrast"] > 5


def _iou(heat: torch.Tensor, truth: torch.Tensor) -> float:
    h = heat > 0.5
    inter = (h & truth).flatten(1).sum(1).float()
    union = (h | truth).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def test_safety_detects_and_localises_toxic_content(flawed):
    safety, judge = ToySafety(), ToyToxicityJudge()
    x, prompts = flawed.pixels(), flawed.captions
    blood = torch.tensor([s["blood"] for s in flawed.scenes])
    nude = torch.tensor([s["nude"] for s in flawed.scenes])
    toxic = blood | nude
    assert blood.sum() > 30 and nude.sum() > 15
    with torch.no_grad():
        scores = safety(x, prompts)
        p_blood = judge(x, prompts, concepts=["blood"] * len(prompts))
        p_nude = judge(x, prompts, concepts=["nudity considered inappropriate"] * len(prompts))
        p_any = judge(x, prompts)
        heat = safety.heatmap(x)
    assert scores[~toxic].mean() > -0.5 and scores[toxic].max() < -5
    assert ((p_blood > 0.5) == blood).float().mean() > 0.99 and ((p_nude > 0.5) == nude).float().mean() > 0.99
    assert ((p_any > 0.5) == toxic).float().mean() > 0.99
    truth = flawed.mask("blood") | flawed.mask("nudity")
    assert _iou(heat[toxic], truth[toxic]) > 0.7  # measured 0.80
    assert heat[~toxic].flatten(1).sum(1).mean() < 0.5
    with pytest.raises(ValueError, match="no toxic concept"):
        judge(x[:1], prompts[:1], concepts=["zombie"])
    assert ToyToxicityJudge(concept="bloody").concept == "blood"


def test_artifacts_detected_and_localised(flawed):
    scorer = ToyArtifacts()
    x = flawed.pixels()
    kinds = np.array([s["artifact"] for s in flawed.scenes])
    with torch.no_grad():
        heat = scorer.heatmap(x)
        scores = scorer.score(x, flawed.captions)
    truth = flawed.mask("artifact")
    for kind in ("blob", "noise"):
        sel = torch.from_numpy(kinds == kind)
        assert sel.sum() > 30
        assert _iou(heat[sel], truth[sel]) > 0.65, kind  # measured blob 0.79, noise 0.80
    clean = torch.from_numpy(kinds == "none")
    assert scores[clean].mean() > -2 and scores[~clean].mean() < -15
    assert scorer.score(noise_images(8), flawed.captions[:8]).max() < -200


def test_attribute_classifier_reads_the_figures(flawed):
    figures = [i for i, s in enumerate(flawed.scenes) if s["kind"] == "figure"]
    x = flawed.pixels(torch.tensor(figures))
    prompts = [flawed.scenes[i]["caption"] for i in figures]
    for attribute, field, bar in (("gender", "gender", 0.98), ("tone", "tone", 0.99), ("race", "tone", 0.99)):
        classifier = ToyAttributeClassifier(attribute)
        probs = classifier.classify(x, prompts)
        assert probs.shape == (len(figures), len(W.ATTRIBUTES[attribute]))
        assert torch.allclose(probs.sum(1), torch.ones(len(figures)), atol=1e-5)
        predicted = [classifier.attributes[k] for k in probs.argmax(1).tolist()]
        accuracy = np.mean([p == flawed.scenes[i][field] for p, i in zip(predicted, figures)])
        assert accuracy > bar, (attribute, accuracy)
    assert torch.allclose(ToyAttributeClassifier("gender", target="female").score(x, prompts),
                          ToyAttributeClassifier("gender").classify(x, prompts)[:, 1])
    from alignment.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown toy attribute"):
        ToyAttributeClassifier("age")
    with pytest.raises(ConfigError, match="target"):
        ToyAttributeClassifier("gender", target="pale")


def test_bias_metrics_on_the_corpus_show_the_planted_skew(flawed):
    from alignment.metrics.bias import attribute_distribution

    classifier = ToyAttributeClassifier("gender")
    doctors = [i for i, s in enumerate(flawed.scenes) if s["caption"] == "a photo of a doctor"]
    nurses = [i for i, s in enumerate(flawed.scenes) if s["caption"] == "a photo of a nurse"]
    dist_d = attribute_distribution(classifier.classify(flawed.pixels(torch.tensor(doctors))))
    dist_n = attribute_distribution(classifier.classify(flawed.pixels(torch.tensor(nurses))))
    assert dist_d[0] > 0.7 and dist_n[1] > 0.7


def test_preference_ranks_correct_clean_images_first():
    """The rater's order: a clean render of the caption > the same with a wrong attribute / an artifact / unasked
    blood; requested blood is not penalised; each term is in its documented range."""
    rater = ToyPreference()
    captions = [W.object_caption("blue", "circle"), W.figure_caption("nurse", gender="male", tone="dark"),
                W.figure_caption("doctor")]
    clean, prompts, _ = renders(captions, seeds=3)
    score = rater.score(clean, prompts)
    assert score.min() > 0.9  # match ~0.9–1 plus a centred bonus
    terms = rater.terms(clean, prompts)
    assert terms["match"].min() > 0.85 and terms["artifact"].max() < 0.1 and terms["toxicity"].max() < 0.1
    # wrong colour / shape / gender: the match term drops
    wrong = [other_colour(captions[0]), other_shape(captions[0]),
             W.figure_caption("nurse", gender="female", tone="dark")]
    x_wrong = W.to_tensor([W.render_caption(c, 0, W.CLEAN_WORLD).image for c in wrong])
    assert (rater.score(x_wrong, [captions[0], captions[0], captions[1]]) < score[[0, 0, 3]] - 0.15).all()

    def render_with(caption, world):
        scene = W.sample_scene(np.random.default_rng([5, 0]), world, caption=caption)
        return W.to_tensor([W.render(scene).image])

    base = W.WorldConfig(p_blood_butcher=0, p_blood_base=0, p_nude_base=0, p_artifact=0, off_centre=0,
                         p_blood_named=1.0)
    plain = rater.score(render_with(captions[0], base), captions[:1])
    blob = rater.score(render_with(captions[0], replace(base, p_artifact=1.0)), captions[:1])
    assert blob < plain - 0.3
    bloody_image = render_with(W.object_caption("blue", "circle", bloody=True), base)
    unasked = rater.score(bloody_image, captions[:1])
    asked = rater.score(bloody_image, [W.object_caption("blue", "circle", bloody=True)])
    assert unasked < asked - 0.5


@pytest.mark.parametrize("cls", [ToyColour, ToyShape, ToyCentring, ToyContrast, ToySafety, ToyArtifacts,
                                 ToyToxicityJudge, ToyAttributeClassifier, ToyPreference])
def test_gradients_reach_the_pixels(cls):
    scorer = cls()
    assert scorer.differentiable
    prompts = ["a bloody blue circle", "a photo of a naked nurse", "a green triangle", "a photo of a doctor"]
    out = [W.render(W.sample_scene(np.random.default_rng([1, i]), W.WorldConfig(p_artifact=1.0), caption=p))
           for i, p in enumerate(prompts)]
    x = W.to_tensor([o.image for o in out]).requires_grad_(True)
    value = scorer(x, prompts)
    assert value.shape == (4,)
    value.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # larger inputs are resized (area) to 32 px, gradients still flow
    big = torch.nn.functional.interpolate(x.detach(), scale_factor=2, mode="nearest").requires_grad_(True)
    scorer(big, prompts).sum().backward()
    assert big.grad.abs().sum() > 0


def test_scorers_check_their_inputs():
    with pytest.raises(ValueError, match="not a toy-world caption"):
        ToyColour().score(noise_images(1), ["a photograph of a cat"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ToyShape().score(noise_images(2), ["a blue circle"])


def test_configs_compose_and_build():
    from hydra import compose, initialize_config_dir

    from alignment.scorers.base import build_scorers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        everything = compose(config_name="config", overrides=["scorers=toy"])
        pair = compose(config_name="config", overrides=["scorers=[toy_colour,toy_contrast]"])
        quality = compose(config_name="config", overrides=["scorers=toy_quality"])
    built = build_scorers(everything.scorers)
    assert list(built) == ["toy_colour", "toy_shape", "toy_centring", "toy_contrast", "toy_safety", "toy_artifacts",
                           "toy_attributes", "toy_toxicity_judge"]
    assert all(not any(p.requires_grad for p in s.parameters()) for s in built.values())
    assert list(pair.scorers) == ["toy_colour", "toy_contrast"]
    assert list(quality.scorers) == ["toy_colour", "toy_shape", "toy_centring", "toy_contrast"]
