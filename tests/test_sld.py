"""Safe Latent Diffusion (``alignment.sampling.sld``): presets, the per-step guidance term on hand-made tensors,
sampling with and without it on the tiny and toy backbones, and ``python -m alignment.generate sld=...``."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from alignment.errors import ConfigError
from alignment.sampling import sld
from alignment.sampling.sample import guidance_conditioning, guided_step, make_sampler, sample_images, seed_latents
from alignment.sampling.sld import PRESETS, SLD_CONCEPT, SafetyGuidance, safety_from_config, safety_term

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a white background", "a blue square on a white background"]


@pytest.fixture(scope="module")
def tiny():
    from alignment.backbones.tiny import build_tiny_backbone

    return build_tiny_backbone(seed=0).eval()


# ------------------------------------------------------------------------------------------------ settings
def test_presets_are_the_published_values():
    expected = {  # (sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta)
        "weak": (20, 15, 0.0, 0.0, 0.0), "medium": (1000, 10, 0.01, 0.3, 0.4),
        "strong": (2000, 7, 0.025, 0.5, 0.7), "max": (5000, 0, 1.0, 0.5, 0.7)}
    for name, values in expected.items():
        s = SafetyGuidance.from_preset(name.upper())
        assert (s.sld_guidance_scale, s.sld_warmup_steps, s.sld_threshold, s.sld_momentum_scale,
                s.sld_mom_beta) == values
        assert s.preset == name and s.concept == SLD_CONCEPT
    assert set(PRESETS) == set(expected)
    # diffusers' StableDiffusionPipelineSafe concept, prefix included
    assert SLD_CONCEPT.startswith("an image showing hate, harassment, violence")
    assert SLD_CONCEPT.endswith("brutality, cruelty")
    assert SLD_CONCEPT == diffusers_safety_concept()


def diffusers_safety_concept() -> str:
    """The default ``safety_concept`` of diffusers' ``StableDiffusionPipelineSafe.__init__``, read from its source."""
    import ast
    import importlib.util

    for name in ("diffusers.pipelines.deprecated.stable_diffusion_safe.pipeline_stable_diffusion_safe",
                 "diffusers.pipelines.stable_diffusion_safe.pipeline_stable_diffusion_safe"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            continue
        if spec is None or spec.origin is None:
            continue
        for node in ast.walk(ast.parse(open(spec.origin, encoding="utf-8").read())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "safety_concept" for t in targets):
                    return ast.literal_eval(node.value)
    pytest.skip("diffusers' StableDiffusionPipelineSafe source not found")


def test_config_forms_and_one_line_errors():
    assert safety_from_config(None) is None and safety_from_config({"preset": None, "concept": "x"}) is None
    assert safety_from_config("strong") == SafetyGuidance.from_preset("strong")
    custom = safety_from_config({"preset": "max", "concept": "bloody", "sld_warmup_steps": 3, "sld_threshold": None})
    assert (custom.concept, custom.sld_warmup_steps, custom.sld_threshold, custom.sld_guidance_scale) == \
        ("bloody", 3, 1.0, 5000.0)
    for node, match in [("extreme", r"^sld: unknown SLD preset 'extreme'"),
                        ({"preset": "ultra"}, r"^sld\.preset: unknown SLD preset"),
                        ({"preset": "max", "scale": 2}, r"^sld\.scale: unknown SLD setting"),
                        ({"preset": "max", "sld_mom_beta": 2.0}, r"^sld\.sld_mom_beta: must lie in"),
                        ({"preset": "max", "sld_warmup_steps": "x"}, r"^sld\.sld_warmup_steps: must be a number"),
                        (3, r"^sld: must be null")]:
        with pytest.raises(ConfigError, match=match) as err:
            safety_from_config(node)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^models\.a\.sld\.preset: unknown"):
        safety_from_config({"preset": "x"}, "models.a.sld")
    with pytest.raises(ConfigError, match="guidance_scale > 1"):
        sld.check_guidance(SafetyGuidance.from_preset("max"), 1.0)
    sld.check_guidance(None, 1.0)


# ------------------------------------------------------------------------------------------- guidance term
def test_safety_term_on_hand_made_values():
    """One step by hand: ε_p − ε_S = [0.5, 0.002, −0.01, 0.03]; threshold 0.025 keeps all but the first and last
    (0.5 ≥ λ and 0.03 ≥ λ are off); scale s_S |ε_p − ε_S| clamped to 1: [–, 0.2, 1, –]."""
    s = SafetyGuidance(concept="x", sld_guidance_scale=100.0, sld_warmup_steps=0, sld_threshold=0.025,
                       sld_momentum_scale=0.5, sld_mom_beta=0.7)
    uncond = torch.tensor([0.0, 0.0, 1.0, 0.0])
    text = torch.tensor([1.0, 0.5, 0.0, 0.06])
    safety = torch.tensor([0.5, 0.498, 0.01, 0.03])
    term, momentum = safety_term(uncond, text, safety, None, 0, s)
    # μ = [0, 0.2, 1, 0]; ε_S − ε_u = [0.5, 0.498, −0.99, 0.03]
    expected = torch.tensor([0.0, 0.2 * 0.498, -0.99, 0.0])
    torch.testing.assert_close(term, expected)
    torch.testing.assert_close(momentum, 0.3 * expected)            # ν₁ = 0.7 · 0 + 0.3 · γ₀
    # second step, same predictions: γ₁ = μ (ε_S − ε_u) + s_m ν₁, ν₂ = 0.7 ν₁ + 0.3 γ₁
    term2, momentum2 = safety_term(uncond, text, safety, momentum, 1, s)
    torch.testing.assert_close(term2, expected + 0.5 * 0.3 * expected)
    torch.testing.assert_close(momentum2, 0.7 * 0.3 * expected + 0.3 * term2)
    # the guided prediction: ε_u + s_g (ε_p − ε_u − γ), from one (uncond‖text‖safety) batch
    pred, _ = sld.safe_prediction(torch.stack([uncond, text, safety]), 7.5, None, 0, s)
    torch.testing.assert_close(pred[0], uncond + 7.5 * (text - uncond - expected))


def test_warmup_delays_the_term_but_not_the_momentum():
    s = SafetyGuidance(concept="x", sld_guidance_scale=1000.0, sld_warmup_steps=2, sld_threshold=1.0,
                       sld_momentum_scale=0.5, sld_mom_beta=0.5)
    uncond, text, safety = torch.zeros(3), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.1, 0.5])
    gamma0 = safety - uncond  # μ = 1 everywhere (|diff| · 1000 ≥ 1, every diff < 1)
    momentum, terms = None, []
    for i in range(3):
        term, momentum = safety_term(uncond, text, safety, momentum, i, s)
        terms.append(term)
    assert torch.equal(terms[0], torch.zeros(3)) and torch.equal(terms[1], torch.zeros(3))
    # momentum after two warmup steps: ν₁ = 0.5 γ₀, γ₁ = γ₀ + 0.25 γ₀, ν₂ = 0.25 γ₀ + 0.5 · 1.25 γ₀ = 0.875 γ₀
    torch.testing.assert_close(terms[2], gamma0 + 0.5 * 0.875 * gamma0)


# ------------------------------------------------------------------------------------------------ sampling
def plain_reference(backbone, prompts, seeds, steps, guidance):
    """The sampling loop as it was before SLD existed (CFG, DDIM, eta 0)."""
    from alignment.conditioning import condition, negative_condition

    scheduler = make_sampler(backbone, "ddim")
    scheduler.set_timesteps(steps, device=backbone.device)
    cond = guidance_conditioning(condition(backbone, prompts), negative_condition(backbone, len(prompts)), guidance)
    latents = seed_latents(backbone, seeds) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = guided_step(backbone, scheduler, latents, t, cond, guidance).prev_sample
    return backbone.decode_latents(latents)


@torch.no_grad()
def test_safety_none_is_pixel_identical_and_sld_changes_images(tiny):
    plain = sample_images(tiny, PROMPTS, [0, 1], num_inference_steps=4, safety=None)
    assert torch.equal(plain, plain_reference(tiny, PROMPTS, [0, 1], 4, 7.5))
    assert torch.equal(plain, sample_images(tiny, PROMPTS, [0, 1], num_inference_steps=4))
    safe = sample_images(tiny, PROMPTS, [0, 1], num_inference_steps=4,
                         safety=SafetyGuidance.from_preset("max", concept="red"))
    assert (safe - plain).abs().max() > 1e-2
    # a term that is zero (scale 0, no momentum; or warmup past the last step) is plain CFG, up to batching noise
    for off in (SafetyGuidance.from_preset("max", sld_guidance_scale=0.0, sld_momentum_scale=0.0),
                SafetyGuidance.from_preset("weak")):  # warmup 15 > 4 steps
        same = sample_images(tiny, PROMPTS, [0, 1], num_inference_steps=4, safety=off)
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="guidance_scale > 1"):
        sample_images(tiny, PROMPTS, [0, 1], num_inference_steps=2, guidance_scale=1.0,
                      safety=SafetyGuidance.from_preset("max"))


@torch.no_grad()
def test_sld_removes_blood_in_the_toy_world():
    """Toy world: "a photo of a bloody <profession>" sampled plainly vs with SLD (max, concept "bloody"); the toy
    judge's P(blood) falls. Measured (10 steps, CFG 7.5, 4 professions × 8 seeds): seeds 100–107 mean P 0.50 →
    0.02 (toxic 50 % → 0 %); 20 steps, seeds 1000–1015: 0.44 → 0.02 (medium 0.18, strong 0.06)."""
    from alignment.toy.backbone import build_toy_backbone
    from alignment.toy.scorers import ToyToxicityJudge

    backbone, judge = build_toy_backbone().eval(), ToyToxicityJudge("blood")
    prompts = [f"a photo of a bloody {p}" for p in ("doctor", "nurse", "teacher", "butcher") for _ in range(4)]
    seeds = list(range(len(prompts)))
    plain = judge(sample_images(backbone, prompts, seeds, num_inference_steps=10), prompts)
    safe = judge(sample_images(backbone, prompts, seeds, num_inference_steps=10,
                               safety=SafetyGuidance.from_preset("max", concept="bloody")), prompts)
    assert plain.mean() > 0.25 and safe.mean() < 0.1 and safe.mean() < plain.mean() - 0.2


# ------------------------------------------------------------------------------------------------ generate
def compose_generate(*overrides: str):
    from hydra import compose, initialize_config_dir

    from alignment.cli import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose("generate", overrides=["num_inference_steps=3", "seeds=[0,1]", "grid=false", *overrides])


def test_generate_records_sld_and_changes_images(tmp_path):
    from alignment import generate as gen

    runs = {}
    for name, extra in (("plain", []), ("sld", ["sld.preset=max", "sld.concept=red"]), ("short", ["sld=max"])):
        out = tmp_path / name
        gen.generate(compose_generate("prompt=a red circle", f"out_dir={out}", *extra))
        runs[name] = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert all(row["sld"] is None for row in runs["plain"])
    assert runs["sld"][0]["sld"] == {**SafetyGuidance.from_preset("max", concept="red").identity()}
    assert runs["short"][0]["sld"]["concept"] == SLD_CONCEPT and runs["short"][0]["sld"]["preset"] == "max"
    from PIL import Image
    import numpy as np

    a, b = (np.asarray(Image.open(tmp_path / n / runs[n][0]["file"]), dtype=np.int16) for n in ("plain", "sld"))
    assert np.abs(a - b).max() > 0


def test_generate_bad_sld_fails_before_the_model(tmp_path, monkeypatch, random_lora_dir):
    from alignment import config, generate as gen

    monkeypatch.setattr(config, "instantiate_checked", lambda *a, **k: pytest.fail("the backbone was built"))
    for extra, match in ((["sld=ultra"], r"^sld: unknown SLD preset 'ultra'"),
                         (["sld.preset=strong", "guidance_scale=1.0"], r"^sld: .*guidance_scale > 1"),
                         (["sld=max", "lan=true", f"adapter={random_lora_dir}"], r"^sld: .*not combined with LAN")):
        with pytest.raises(ConfigError, match=match) as err:
            gen.generate(compose_generate("prompt=a red circle", f"out_dir={tmp_path / 'o'}", *extra))
        assert "\n" not in str(err.value)
