"""ImageReward offline: a tiny random model of the same architecture, saved as an ImageReward.pt with the package's
key names (THUDM/ImageReward: blip.visual_encoder.* = BLIP models/vit.py, blip.text_encoder.* = models/med.py,
mlp.layers.*), loaded through the converter and checked against a plain-torch re-implementation of the package's
forward pass, the head formula, preprocessing and gradient flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from alignment.config import instantiate_checked
from alignment.errors import AlignmentError, ConfigError
from alignment.scorers.base import CLIP_MEAN, CLIP_STD, build_scorers, clip_preprocess
from alignment.scorers.imagereward import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageReward, ImageRewardModel,
                                           convert_imagereward_state_dict, to_imagereward_state_dict)
from tests.conftest import REPO

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=16)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "the", "on",
         "grass", "##s", "sitting", "green"]
TEXT = dict(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=40)
PROMPTS = ["a photo of a cat", "a red dog sitting on the green grass"]


def their_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward.pt state dict with the package's names (built by inverting the converter on a tiny
    model, values re-drawn so that every weight matters), plus the unused keys the real file carries."""
    ours = ImageRewardModel(VISION, TEXT).state_dict()
    gen = torch.Generator().manual_seed(seed)
    theirs = {k: (torch.randn(v.shape, generator=gen) * (0.5 if v.ndim > 1 else 0.1)
                  + (1.0 if "norm" in k.lower() and k.endswith("weight") else 0.0))
              for k, v in to_imagereward_state_dict(ours).items()}
    theirs["blip.vision_proj.weight"] = torch.randn(8, VISION["hidden_size"], generator=gen)
    theirs["blip.vision_proj.bias"] = torch.zeros(8)
    theirs["blip.text_proj.weight"] = torch.randn(8, TEXT["hidden_size"], generator=gen)
    theirs["blip.text_proj.bias"] = torch.zeros(8)
    theirs["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    return theirs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "tokenizer")
    theirs = their_state_dict()
    torch.save(theirs, root / "ImageReward.pt")
    return root, theirs


@pytest.fixture(scope="module")
def scorer(files):
    root, _ = files
    return ImageReward(checkpoint=str(root / "ImageReward.pt"), tokenizer=str(root / "tokenizer"),
                       vision=VISION, text=TEXT).freeze()


def images(batch: int = 2, h: int = 96, w: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- the package's forward pass, in plain torch
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def reference_vit(pixels, sd, heads):
    """BLIP models/vit.py VisionTransformer.forward (timm): pre-norm blocks, LayerNorm eps 1e-6."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"],
                 stride=sd[p + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, :x.shape[1]]
    b, n, c = x.shape
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        q = f"{p}blocks.{i}."
        qkv = _lin(_ln(x, sd, q + "norm1", 1e-6), sd, q + "attn.qkv")
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        x = x + _lin((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), sd, q + "attn.proj")
        h = F.gelu(_lin(_ln(x, sd, q + "norm2", 1e-6), sd, q + "mlp.fc1"))
        x = x + _lin(h, sd, q + "mlp.fc2")
        i += 1
    return _ln(x, sd, p + "norm", 1e-6)


def reference_med(input_ids, attention_mask, image_embeds, sd, heads):
    """BLIP models/med.py BertModel.forward(mode='multimodal'): post-norm layers, eps 1e-12, -10000 mask."""
    p = "blip.text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: input_ids.shape[1]][None]
    x = _ln(x, sd, p + "embeddings.LayerNorm", 1e-12)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def attention(hidden, context, mask, name):
        b, n, c = hidden.shape
        d = c // heads
        q = _lin(hidden, sd, name + ".self.query").view(b, n, heads, d).transpose(1, 2)
        k = _lin(context, sd, name + ".self.key").view(b, context.shape[1], heads, d).transpose(1, 2)
        v = _lin(context, sd, name + ".self.value").view(b, context.shape[1], heads, d).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + mask).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return _ln(_lin(out, sd, name + ".output.dense") + hidden, sd, name + ".output.LayerNorm", 1e-12)

    i = 0
    while f"{p}encoder.layer.{i}.attention.self.query.weight" in sd:
        q = f"{p}encoder.layer.{i}."
        x = attention(x, x, self_mask, q + "attention")
        x = attention(x, image_embeds, torch.zeros(()), q + "crossattention")
        h = F.gelu(_lin(x, sd, q + "intermediate.dense"))
        x = _ln(_lin(h, sd, q + "output.dense") + x, sd, q + "output.LayerNorm", 1e-12)
        i += 1
    return x


def reference_head(features, sd):
    """ImageReward MLP (no activations; dropouts are identity in eval) and (reward - mean) / std."""
    for index in (0, 2, 4, 6, 7):
        features = _lin(features, sd, f"mlp.layers.{index}")
    return ((features - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


# ------------------------------------------------------------------------------------------------------- tests
def test_constants_are_the_packages():
    assert IMAGEREWARD_MEAN == 0.16717362830052426 and IMAGEREWARD_STD == 1.0333394966054072


def test_converter_round_trips_and_rejects_unknown_keys(files):
    _, theirs = files
    ours = convert_imagereward_state_dict(theirs)
    assert not any(k.startswith("blip.") for k in ours)
    assert set(ours) == set(ImageRewardModel(VISION, TEXT).state_dict())
    used = {k: v for k, v in theirs.items() if "_proj." not in k and not k.endswith("position_ids")}
    back = to_imagereward_state_dict(ours)
    assert set(back) == set(used) and all(torch.equal(back[k], used[k]) for k in used)
    again = convert_imagereward_state_dict(back)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    with pytest.raises(KeyError):
        convert_imagereward_state_dict({"blip.visual_encoder.head.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        to_imagereward_state_dict({"visual_encoder.something.weight": torch.zeros(1)})


def test_checkpoint_loads_strictly_with_identical_weights(scorer, files):
    _, theirs = files
    expected = convert_imagereward_state_dict(theirs)
    loaded = scorer.model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert scorer.differentiable and not any(p.requires_grad for p in scorer.parameters())


def test_tokenisation_follows_imagereward(scorer):
    ids, mask = scorer.tokenize(PROMPTS + [" ".join(["cat"] * 50)])
    assert ids.shape == (3, 35) and mask.shape == (3, 35)
    assert (ids[:, 0] == scorer.tokenizer.cls_token_id).all()          # [CLS] stays first (no [ENC] swap)
    assert ids[2, -1] == scorer.tokenizer.sep_token_id and mask[2].all()  # truncated to 35
    assert mask[0].sum() == 7 and (ids[0, 7:] == 0).all()               # [CLS] a photo of a cat [SEP] + pads
    assert scorer.tokenizer.convert_tokens_to_ids("[ENC]") == len(WORDS) + 1  # BLIP's init_tokenizer additions


def test_preprocessing_matches_resize_crop_normalise():
    """Resize(64, bicubic) -> CenterCrop(64) -> CLIP mean/std, against PIL for a 96x128 image."""
    x = images(1)
    ours = clip_preprocess(x, size=64)
    assert ours.shape == (1, 3, 64, 64)
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pil = pil.resize((85, 64), Image.BICUBIC).crop((10, 0, 74, 64))  # torchvision: int(64*128/96)=85, left 10
    ref = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert (ours - ref).abs().mean() < 0.05


def test_forward_matches_the_package_computation(scorer, files):
    _, theirs = files
    x = images(2)
    got = scorer(x, PROMPTS)
    assert got.shape == (2,) and got.dtype == torch.float32
    pixels = scorer.preprocess(x)
    ids, mask = scorer.tokenize(PROMPTS)
    image_embeds = reference_vit(pixels, theirs, VISION["num_attention_heads"])
    text = reference_med(ids, mask, image_embeds, theirs, TEXT["num_attention_heads"])
    expected = reference_head(text[:, 0, :], theirs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got[0] - got[1]).abs() > 1e-3  # the weights matter: different inputs, different rewards


def test_head_and_normalisation_by_hand(scorer):
    x = images(2, seed=1)
    with torch.no_grad():
        features = scorer.model.text_features(scorer.preprocess(x), *scorer.tokenize(PROMPTS))
        reward = features
        for index in (0, 2, 4, 6, 7):
            layer = scorer.model.mlp.layers[index]
            reward = reward @ layer.weight.T + layer.bias
        expected = (reward.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
        torch.testing.assert_close(scorer(x, PROMPTS), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_pixels(scorer):
    x = images(2, seed=2).requires_grad_(True)
    scorer(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_score_accepts_pil_images(scorer):
    x = (images(2, seed=3) * 255).round() / 255
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in x]
    got = scorer.score(pil, PROMPTS, batch_size=1)
    assert got.shape == (2,) and got.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(got, scorer(x, PROMPTS), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ config/errors
def test_checkpoint_null_is_a_one_line_error(tmp_path):
    node = OmegaConf.load(REPO / "conf" / "scorers" / "imagereward.yaml")
    assert node.imagereward.checkpoint is None and node.imagereward.tokenizer == "bert-base-uncased"
    with pytest.raises(ConfigError) as info:
        build_scorers(node)
    message = str(info.value)
    assert "\n" not in message and message.startswith("scorers.imagereward.checkpoint is required")


def test_missing_weight_file_names_it(files, tmp_path):
    root, _ = files
    node = OmegaConf.create({"_target_": "alignment.scorers.imagereward.ImageReward",
                             "checkpoint": str(tmp_path / "nope" / "ImageReward.pt"),
                             "tokenizer": str(root / "tokenizer")})
    with pytest.raises(ConfigError) as info:
        instantiate_checked(node, "scorers.imagereward")
    assert str(info.value) == f"scorers.imagereward.checkpoint: weight file {tmp_path / 'nope' / 'ImageReward.pt'} " \
                              f"does not exist"


def test_bad_checkpoints_name_the_key(files, tmp_path):
    root, theirs = files
    wrong = dict(theirs)
    wrong["blip.visual_encoder.pos_embed"] = torch.zeros(1, 5, VISION["hidden_size"])
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match=r"'blip.visual_encoder.pos_embed' .* has shape \(1, 5, 32\)"):
        ImageReward(str(tmp_path / "wrong.pt"), str(root / "tokenizer"), vision=VISION, text=TEXT)
    partial = {k: v for k, v in theirs.items() if not k.startswith("mlp.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"lacks 'mlp.layers.0.weight' \(10 missing weights\)"):
        ImageReward(str(tmp_path / "partial.pt"), str(root / "tokenizer"), vision=VISION, text=TEXT)
    torch.save({**theirs, "blip.visual_encoder.head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"'blip.visual_encoder.head.weight', which is not an ImageReward"):
        ImageReward(str(tmp_path / "extra.pt"), str(root / "tokenizer"), vision=VISION, text=TEXT)
    with pytest.raises(ConfigError, match=r"^scorers.imagereward.tokenizer: folder .*/no_tok does not exist$"):
        ImageReward(str(root / "ImageReward.pt"), str(tmp_path / "no_tok"), vision=VISION, text=TEXT)


def test_scorer_configs_merge_and_unknown_names_fail():
    conf_dir = str(REPO / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["scorers=[imagereward,toxicity_judge]"])
    assert cfg.scorers.imagereward._target_ == "alignment.scorers.imagereward.ImageReward"
    assert cfg.scorers.toxicity_judge._target_ == "alignment.scorers.toxicity.ToxicityJudge"
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        with pytest.raises(Exception, match="scorers/nope"):
            compose(config_name="config", overrides=["scorers=[imagereward,nope]"])
    with pytest.raises(AlignmentError, match=r"^scorers.imagereward.chekpoint: unknown key"):
        build_scorers(OmegaConf.create({"imagereward": {"_target_": "alignment.scorers.imagereward.ImageReward",
                                                        "chekpoint": "x"}}))
