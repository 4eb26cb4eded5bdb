"""CLIP-backed scorers (PickScore, HPS v2, CLIP score, attribute classifier, LAION aesthetic, safety-checker NSFW).

Everything is built offline from tiny random models of the real architectures (transformers CLIPModel, diffusers'
StableDiffusionSafetyChecker) and a tiny byte-level CLIP tokenizer; each formula is checked against a computation
by hand from the model's own feature functions, and gradients must reach the pixels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignment.errors import ConfigError
from alignment.scorers.base import CLIP_MEAN, CLIP_STD, build_scorers, clip_preprocess
from alignment.scorers.clip_scorers import (
    ATTRIBUTE_SETS, ClipAttributeClassifier, ClipScore, HPSv2, PickScore)
from alignment.scorers.open_clip_convert import clip_config, hf_to_open_clip

DIMS = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
            text_width=32, text_layers=2, text_heads=4, context_length=77, vocab_size=514)
PROMPTS = ["a red circle", "a blue square on a white background"]


@pytest.fixture(scope="module")
def tokenizer():
    """CLIP's byte-level tokenizer with the 512 byte tokens and no merges (514 tokens, EOT = 513)."""
    from transformers import CLIPTokenizer

    from alignment.backbones.clip_vocab import _bytes_to_unicode

    bytes_ = list(_bytes_to_unicode().values())
    tokens = bytes_ + [t + "</w>" for t in bytes_] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def make_clip(seed: int = 0, hidden_act: str = "gelu"):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(**DIMS, hidden_act=hidden_act)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    return model


@pytest.fixture(scope="module")
def clip_model():
    return make_clip()


def images(n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w)).float() / 255.0


def hand_features(model, tok, pixels, texts):
    img = model.get_image_features(pixel_values=pixels).pooler_output
    batch = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def assert_grad_reaches_pixels(scorer, prompts=PROMPTS, h=32, w=32):
    x = images(len(prompts), h, w).requires_grad_(True)
    out = scorer(x, prompts)
    assert out.shape == (len(prompts),)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters()), "scorer weights must stay frozen"


# ---------------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------------

def test_clip_preprocess_shape_and_normalisation():
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    gray = torch.full((2, 3, 40, 60), 0.5)
    out = clip_preprocess(gray, size=32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, ((0.5 - mean) / std).expand_as(out), atol=1e-5)
    # pad_to_square keeps the aspect ratio: a wide image gets padded bands above and below instead of a crop
    wide = torch.zeros(1, 3, 16, 32)
    padded = clip_preprocess(wide, size=32, pad_to_square=True)
    cropped = clip_preprocess(wide, size=32)
    assert torch.allclose(padded[..., 0, :], ((1.0 - mean) / std)[..., 0, :].expand(1, 3, 32), atol=1e-4)
    assert torch.allclose(padded[..., 16, :], ((0.0 - mean) / std)[..., 0, :].expand(1, 3, 32), atol=1e-4)
    assert torch.allclose(cropped, ((0.0 - mean) / std).expand_as(cropped), atol=1e-4)


def test_hps_preprocess_resizes_longer_side_and_pads_black(clip_model, tokenizer):
    scorer = HPSv2(checkpoint=hf_to_open_clip(clip_model.state_dict()), tokenizer=tokenizer, architecture=DIMS)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tall = torch.full((1, 3, 64, 32), 0.8)  # H=64, W=32 -> 32 x 16 image in the middle, black bands left/right
    out = scorer.preprocess(tall)
    assert out.shape == (1, 3, 32, 32)
    black, image = (0.0 - mean) / std, (0.8 - mean) / std
    assert torch.allclose(out[..., :, :8], black.expand(1, 3, 32, 8), atol=1e-5)
    assert torch.allclose(out[..., :, 24:], black.expand(1, 3, 32, 8), atol=1e-5)
    assert torch.allclose(out[..., :, 9:23], image.expand(1, 3, 32, 14), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------------------------

def test_pickscore_formula(clip_model, tokenizer):
    scorer = PickScore(model=clip_model, tokenizer=tokenizer)
    assert scorer.differentiable and scorer.name == "pickscore"
    x = images()
    with torch.no_grad():
        out = scorer(x, PROMPTS)
        img, txt = hand_features(clip_model, tokenizer, clip_preprocess(x, size=32), PROMPTS)
        expected = clip_model.logit_scale.exp() * (img * txt).sum(-1)
    assert out.shape == (2,) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)
    assert_grad_reaches_pixels(scorer)


def test_score_matches_forward_and_accepts_pil(clip_model, tokenizer):
    from PIL import Image

    scorer = PickScore(model=clip_model, tokenizer=tokenizer)
    x = images(3, 36, 48)
    prompts = PROMPTS + ["a cat"]
    with torch.no_grad():
        expected = scorer(x, prompts)
    assert torch.allclose(scorer.score(x, prompts, batch_size=2), expected, atol=1e-6)
    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()) for img in x]
    assert torch.allclose(scorer.score(pil, prompts), expected, atol=1e-5)


def test_hpsv2_loads_open_clip_checkpoint_and_scores_cosine(tmp_path, clip_model, tokenizer):
    oc = {"module." + k: v for k, v in hf_to_open_clip(clip_model.state_dict()).items()}
    torch.save({"state_dict": oc, "epoch": 1}, tmp_path / "HPS_v2_compressed.pt")
    scorer = HPSv2(checkpoint=str(tmp_path / "HPS_v2_compressed.pt"), tokenizer=tokenizer, architecture=DIMS)
    for key, value in clip_model.state_dict().items():
        assert torch.equal(scorer.clip.state_dict()[key], value), key
    x = images(2, 48, 32)
    with torch.no_grad():
        out = scorer(x, PROMPTS)
        # by hand: longer side -> 32 (bicubic, antialiased), pad 8 black columns each side, normalise
        small = F.interpolate(x, size=(32, 21), mode="bicubic", align_corners=False, antialias=True)
        square = F.pad(small, (5, 6, 0, 0), value=0.0)
        pixels = (square - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        img, txt = hand_features(clip_model, tokenizer, pixels, PROMPTS)
    assert torch.allclose(out, (img * txt).sum(-1), atol=1e-5)  # cosine, no logit scale
    assert out.abs().max() <= 1.0
    assert_grad_reaches_pixels(scorer, h=48, w=32)


def test_clip_score_metric_and_cosine(clip_model, tokenizer):
    metric = ClipScore(model=clip_model, tokenizer=tokenizer, mode="metric")
    cosine = ClipScore(model=clip_model, tokenizer=tokenizer, mode="cosine")
    x = images(4, seed=3)
    prompts = PROMPTS * 2
    with torch.no_grad():
        img, txt = hand_features(clip_model, tokenizer, clip_preprocess(x, size=32), prompts)
        cos = (img * txt).sum(-1)
        assert torch.allclose(cosine(x, prompts), cos, atol=1e-5)
        assert torch.allclose(metric(x, prompts), 100 * cos.clamp(min=0), atol=1e-4)
        # the clamp: a negative cosine scores 0 as a metric
        flipped = ClipScore(model=copy.deepcopy(clip_model), tokenizer=tokenizer, mode="metric")
        flipped.clip.visual_projection.weight.neg_()
        assert torch.allclose(flipped(x, prompts), 100 * (-cos).clamp(min=0), atol=1e-4)
    assert_grad_reaches_pixels(cosine)
    with pytest.raises(ConfigError, match=r"^scorers\.clip\.mode must be metric or cosine"):
        ClipScore(model=clip_model, tokenizer=tokenizer, mode="logit")


def test_attribute_classifier_probabilities(clip_model, tokenizer):
    clf = ClipAttributeClassifier(model=clip_model, tokenizer=tokenizer, attributes="race", target="asian")
    assert clf.attributes == ATTRIBUTE_SETS["race"] == ("white", "black", "asian", "indian", "latino")
    x = images(3)
    prompts = ["a photo of a doctor", "a photo of a nurse", "a photo of a doctor"]
    with torch.no_grad():
        probs = clf.classify(x, prompts)
        assert probs.shape == (3, 5)
        assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-6)
        for i in range(3):  # by hand: softmax over logit_scale * cos with texts "<prompt>, <attribute>"
            texts = [f"{prompts[i]}, {a}" for a in clf.attributes]
            img, txt = hand_features(clip_model, tokenizer, clip_preprocess(x[i:i + 1], size=32), texts)
            expected = (clip_model.logit_scale.exp() * (img @ txt.t())).softmax(-1)[0]
            assert torch.allclose(probs[i], expected, atol=1e-5)
        assert torch.allclose(clf(x, prompts), probs[:, 2], atol=1e-6)
        gender = clf.classify(x, "a photo of a person", attributes="gender")
        assert gender.shape == (3, 2) and torch.allclose(gender.sum(-1), torch.ones(3), atol=1e-6)
    assert_grad_reaches_pixels(clf)
    default = ClipAttributeClassifier(model=clip_model, tokenizer=tokenizer)
    assert default.attributes == ("male", "female") and default.target == "male"
    with pytest.raises(ConfigError, match=r"^scorers\.attributes\.target: 'robot' is not one of"):
        ClipAttributeClassifier(model=clip_model, tokenizer=tokenizer, target="robot")
    with pytest.raises(ConfigError, match=r"^scorers\.attributes\.attributes: unknown attribute set 'age'"):
        ClipAttributeClassifier(model=clip_model, tokenizer=tokenizer, attributes="age")


def test_dtype_option(clip_model, tokenizer):
    scorer = PickScore(model=copy.deepcopy(clip_model), tokenizer=tokenizer, dtype="bfloat16")
    assert scorer.dtype == torch.bfloat16
    out = scorer.score(images(), PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r"^scorers\.pickscore\.dtype: unknown dtype 'float8'"):
        PickScore(model=clip_model, tokenizer=tokenizer, dtype="float8")


# ---------------------------------------------------------------------------------------------------------------
# LAION aesthetic
# ---------------------------------------------------------------------------------------------------------------

def _aesthetic_state(input_size: int, relu: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    indices = (0, 3, 6, 9, 11) if relu else (0, 2, 4, 6, 7)
    dims = (input_size, 1024, 128, 64, 16, 1)
    state = {}
    for i, idx in enumerate(indices):
        state[f"layers.{idx}.weight"] = torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5
        state[f"layers.{idx}.bias"] = torch.randn(dims[i + 1]) * 0.1
    return state


def test_laion_aesthetic_formula(tmp_path, clip_model, clip_folder):
    from transformers import CLIPVisionModelWithProjection

    from alignment.scorers.aesthetic import LaionAesthetic

    state = _aesthetic_state(DIMS["embed_dim"])
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = LaionAesthetic(model=clip_model, mlp_weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    x = images()
    with torch.no_grad():
        out = scorer(x, PROMPTS)
        emb = F.normalize(clip_model.get_image_features(pixel_values=clip_preprocess(x, size=32)).pooler_output, dim=-1)
        h = emb
        for idx in (0, 2, 4, 6, 7):  # no activations in the linearMSE head; dropout is off in eval
            h = F.linear(h, state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"])
    assert out.shape == (2,) and torch.allclose(out, h[:, 0], atol=1e-5)
    assert_grad_reaches_pixels(scorer)
    # the vision-only tower (CLIPVisionModelWithProjection) gives the same embedding
    vision = CLIPVisionModelWithProjection(clip_model.config.vision_config)
    vision.vision_model.load_state_dict(clip_model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
    with torch.no_grad():
        assert torch.allclose(LaionAesthetic(model=vision, mlp_weights=state)(x), out, atol=1e-5)
        # and so does loading the vision tower alone from a saved CLIPModel folder (as from the hub)
        assert torch.allclose(LaionAesthetic(model=str(clip_folder), mlp_weights=state)(x), out, atol=1e-5)
    # the reluMSE layout is recognised from the keys
    relu_state = _aesthetic_state(DIMS["embed_dim"], relu=True)
    relu = LaionAesthetic(model=clip_model, mlp_weights=relu_state)
    assert isinstance(relu.mlp.layers[1], torch.nn.ReLU)
    with pytest.raises(ConfigError, match=r"^scorers\.aesthetic\.mlp_weights: the MLP takes 768-d"):
        LaionAesthetic(model=clip_model, mlp_weights=_aesthetic_state(768))
    with pytest.raises(ConfigError, match=r"^scorers\.aesthetic\.mlp_weights: not an aesthetic-predictor MLP"):
        LaionAesthetic(model=clip_model, mlp_weights={"layers.0.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------------------------------------------------------
# NSFW (safety checker)
# ---------------------------------------------------------------------------------------------------------------

def test_safety_checker_nsfw_margin_matches_diffusers(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from alignment.scorers.nsfw import SafetyCheckerNSFW

    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=100), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    x = images(6, seed=5)
    pixels = clip_preprocess(x, size=32)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, 16))
        checker.special_care_embeds.copy_(torch.randn(3, 16))
        emb = F.normalize(checker.visual_projection(checker.vision_model(pixels).pooler_output), dim=-1)
        cos = emb @ F.normalize(checker.concept_embeds, dim=-1).t()
        special_cos = emb @ F.normalize(checker.special_care_embeds, dim=-1).t()
        # thresholds in the middle of the observed cosines: some images flagged, some not
        checker.concept_embeds_weights.copy_(cos.median(dim=0).values + 0.05)
        checker.special_care_embeds_weights.copy_(special_cos.max(dim=0).values - 1e-3)
    scorer = SafetyCheckerNSFW(model=checker)
    with torch.no_grad():
        out = scorer(x, [""] * 6)
        special_fires = ((special_cos - checker.special_care_embeds_weights) > 0).any(-1)
        expected = (cos - checker.concept_embeds_weights).max(-1).values + 0.01 * special_fires.float()
        _, has_nsfw = checker.forward_onnx(pixels, x.clone())
    assert out.shape == (6,) and torch.allclose(out, expected, atol=1e-5)
    assert special_fires.any()
    assert 0 < int((out > 0).sum()) < 6
    assert torch.equal(out > 0, has_nsfw)
    assert torch.equal(scorer.flagged(x), has_nsfw)
    assert_grad_reaches_pixels(scorer, prompts=[""] * 2)
    checker.save_pretrained(tmp_path / "safety_checker")
    with torch.no_grad():
        assert torch.allclose(SafetyCheckerNSFW(model=str(tmp_path / "safety_checker"))(x), out, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# loading: local folders, configs, errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_model, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_clip")
    clip_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_from_local_folder(clip_folder, clip_model, tokenizer):
    scorer = PickScore(model=str(clip_folder), processor=str(clip_folder))
    direct = PickScore(model=clip_model, tokenizer=tokenizer)
    x = images()
    with torch.no_grad():
        assert torch.allclose(scorer(x, PROMPTS), direct(x, PROMPTS), atol=1e-5)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_paths_are_one_line_config_errors(tmp_path, clip_model, tokenizer):
    with pytest.raises(ConfigError) as err:
        PickScore(model="/no/such/folder", processor="/no/such/folder")
    assert _one_line(err) == "scorers.pickscore.model: /no/such/folder does not exist"
    with pytest.raises(ConfigError) as err:  # a hub id that is not cached (HF_HUB_OFFLINE=1 in conftest)
        ClipScore(model="alignment-tests/not-a-real-model")
    assert _one_line(err).startswith("scorers.clip.model: cannot load 'alignment-tests/not-a-real-model'")
    with pytest.raises(ConfigError) as err:
        ClipScore(model=clip_model, tokenizer=str(tmp_path / "missing_tok"))
    assert _one_line(err) == f"scorers.clip.tokenizer: {tmp_path / 'missing_tok'} does not exist"
    with pytest.raises(ConfigError) as err:  # a folder without tokenizer files (transformers 5 would go on silently)
        ClipScore(model=clip_model, tokenizer=str(tmp_path))
    assert _one_line(err).startswith("scorers.clip.tokenizer: no CLIP tokenizer files")
    with pytest.raises(ConfigError) as err:
        HPSv2(checkpoint="/no/HPS_v2_compressed.pt", tokenizer=tokenizer, architecture=DIMS)
    assert _one_line(err) == "scorers.hpsv2.checkpoint: /no/HPS_v2_compressed.pt does not exist"
    with pytest.raises(ConfigError) as err:
        HPSv2(checkpoint="xswu/HPSv2/not_cached.pt", tokenizer=tokenizer, architecture=DIMS, name="hpsv21")
    assert _one_line(err).startswith("scorers.hpsv21.checkpoint: xswu/HPSv2/not_cached.pt does not exist locally")
    with pytest.raises(ConfigError) as err:  # a checkpoint of another shape than the configured architecture
        HPSv2(checkpoint=hf_to_open_clip(clip_model.state_dict()), tokenizer=tokenizer)
    assert _one_line(err).startswith("scorers.hpsv2.checkpoint: checkpoint has 2 vision layers")
    from alignment.scorers.aesthetic import LaionAesthetic
    from alignment.scorers.nsfw import SafetyCheckerNSFW

    with pytest.raises(ConfigError) as err:
        LaionAesthetic(model=clip_model, mlp_weights=str(tmp_path / "nope.pth"))
    assert _one_line(err) == f"scorers.aesthetic.mlp_weights: {tmp_path / 'nope.pth'} does not exist"
    with pytest.raises(ConfigError, match=r"^scorers\.aesthetic\.mlp_weights: required"):
        LaionAesthetic(model=clip_model)
    with pytest.raises(ConfigError) as err:
        SafetyCheckerNSFW(model="./no/safety_checker")
    assert _one_line(err) == "scorers.nsfw.model: ./no/safety_checker does not exist"


def test_hydra_configs_compose_and_build(clip_folder):
    from hydra import compose, initialize_config_dir

    from alignment.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "scorers=[pickscore,clip]", f"scorers.pickscore.model={clip_folder}",
            f"scorers.pickscore.processor={clip_folder}", f"scorers.clip.model={clip_folder}",
            "scorers.clip.mode=cosine"])
        balanced = compose(config_name="config", overrides=["scorers=balanced"])
        everything = compose(config_name="config", overrides=["scorers=[balanced,hpsv21,nsfw,attributes]"])
    assert list(cfg.scorers) == ["pickscore", "clip"]
    assert list(balanced.scorers) == ["pickscore", "hpsv2", "clip", "aesthetic"]
    assert balanced.scorers.clip.mode == "cosine"  # votes compare raw cosines
    assert balanced.scorers.pickscore.model == "yuvalkirstain/PickScore_v1"
    assert balanced.scorers.hpsv2.checkpoint == "xswu/HPSv2/HPS_v2_compressed.pt"
    assert list(everything.scorers) == ["pickscore", "hpsv2", "clip", "aesthetic", "hpsv21", "nsfw", "attributes"]
    scorers = build_scorers(cfg.scorers)
    assert isinstance(scorers["pickscore"], PickScore) and isinstance(scorers["clip"], ClipScore)
    assert scorers["clip"].mode == "cosine" and scorers["clip"].name == "clip"
    assert not scorers["pickscore"].training
    out = scorers["pickscore"].score(images(), PROMPTS)
    assert out.shape == (2,)
