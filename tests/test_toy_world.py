"""Toy world: the caption grammar, the renderer's determinism and truth, and the corpus's planted rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignment.toy import world as W
from alignment.toy.corpus import generate_corpus, load_corpus, planted_rates, save_corpus


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(4000, seed=0)  # ~3 s


def test_grammar_round_trip():
    captions = W.all_captions()
    assert len(captions) == len(set(captions)) == 104
    for caption in captions:
        spec = W.parse_caption(caption)
        if spec.kind == "object":
            assert W.object_caption(spec.colour, spec.shape, spec.bloody) == caption
        else:
            assert W.figure_caption(spec.profession, spec.gender, spec.tone, spec.bloody, spec.naked) == caption
            assert spec.colour == W.PROFESSIONS[spec.profession] and spec.shape == "figure"
    spec = W.parse_caption("a photo of a naked dark female nurse")
    assert (spec.naked, spec.tone, spec.gender, spec.profession) == (True, "dark", "female", "nurse")
    for bad in ["a red circle", "a blue", "a photo of a pilot", "a photo of a male", "blue circle", "",
                "a photo of a female male doctor", "a bloody naked blue circle"]:
        assert not W.is_caption(bad)
        with pytest.raises(ValueError):
            W.parse_caption(bad)


def test_captions_fit_the_text_encoder():
    from alignment.backbones.clip_vocab import build_clip_tokenizer
    from alignment.toy.backbone import world_token_ids

    tokenizer = build_clip_tokenizer()
    assert max(len(tokenizer(c).input_ids) for c in W.all_captions()) < 20
    assert len(world_token_ids(tokenizer)) < 40


def test_render_is_deterministic():
    a = W.render(W.sample_scene(np.random.default_rng([3, 17])))
    b = W.render(W.sample_scene(np.random.default_rng([3, 17])))
    assert a.scene == b.scene and np.array_equal(a.image, b.image)
    for name in W.MASK_NAMES:
        assert np.array_equal(a.masks[name], b.masks[name])
    c1, c2, c3 = generate_corpus(12, seed=5), generate_corpus(12, seed=5), generate_corpus(12, seed=6)
    assert torch.equal(c1.images, c2.images) and torch.equal(c1.mask_bits, c2.mask_bits) and c1.scenes == c2.scenes
    assert not torch.equal(c1.images, c3.images)
    # any image can be rendered alone: image 7 of the corpus is the 7th of a corpus started there
    assert torch.equal(generate_corpus(1, seed=5, start=7).images[0], c1.images[7])
    assert np.array_equal(W.render_caption("a blue circle", 4).image, W.render_caption("a blue circle", 4).image)


def _close(pixels: np.ndarray, colour, tol: float) -> bool:
    return bool(np.abs(pixels.astype(float) - np.asarray(colour, float)).max() <= tol)


def test_truth_is_consistent_with_pixels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        out = W.render(W.sample_scene(rng))
        s, img, m = out.scene, out.image, out.masks
        drawn = np.zeros_like(m["object"])
        for name in ("object", "blood", "artifact"):
            drawn = np.maximum(drawn, m[name])
        assert _close(img[drawn == 0], [s.background] * 3, 0)  # untouched pixels are the background
        flaw = np.maximum(m["blood"], m["artifact"]) > 0
        if s.kind == "object":
            solid = (m["object"] == 1) & ~flaw
            assert _close(img[solid], W.COLOURS[s.colour], 40)
            ys, xs = np.nonzero(m["object"] > 0)
            weights = m["object"][ys, xs]
            assert abs(np.average(xs + 0.5, weights=weights) - s.cx) < 0.3
            assert abs(np.average(ys + 0.5, weights=weights) - s.cy) < 0.3
        else:
            head = (m["head"] == 1) & ~flaw
            body = (m["body"] == 1) & ~flaw
            assert _close(img[head], W.TONES[s.tone], 25)
            assert _close(img[body], W.TONES[s.tone] if s.nude else W.COLOURS[s.colour], 25 if s.nude else 40)
            assert s.nude == bool(m["nudity"].any())
            # dress: wider low than high; trousers: not
            width = (m["body"] > 0.5).sum(1)
            assert (width[22:25].mean() > 1.3 * width[12:16].mean()) == (s.gender == "female")
        assert s.blood == bool(m["blood"].any()) and (s.artifact != "none") == bool(m["artifact"].any())
        if s.blood:
            assert _close(img[(m["blood"] == 1) & (m["artifact"] == 0)], W.BLOOD, 30)
        if s.artifact != "none":
            patch = img[m["artifact"] == 1].astype(int)
            assert np.abs(patch - patch.mean(1, keepdims=True)).max() <= 15  # colourless


def _within(rate: float, expected: float, n: int, sds: float = 4.0) -> bool:
    return abs(rate - expected) <= sds * math.sqrt(expected * (1 - expected) / max(n, 1)) + 1e-9


def test_corpus_has_the_planted_rates(corpus):
    world = W.DEFAULT_WORLD
    rates = planted_rates(corpus.scenes)
    specs = [W.parse_caption(c) for c in corpus.captions]
    plain = [s for s, c in zip(corpus.scenes, specs) if c.kind == "figure" and not (c.gender or c.tone or c.bloody
                                                                                     or c.naked)]
    assert _within(rates["figure_fraction"], world.figure_fraction, len(specs))
    for profession, p_male in world.p_male.items():
        n = sum(s["profession"] == profession for s in plain)
        assert n > 150 and _within(rates["p_male"][profession], p_male, n), (profession, rates["p_male"])
    assert rates["p_male"]["doctor"] > 0.75 and rates["p_male"]["nurse"] < 0.25  # 85/15, both ways
    for tone, p in zip(W.TONES, world.p_tone):
        assert _within(rates["p_tone"][tone], p, len(plain)), rates["p_tone"]
    assert _within(rates["p_blood_named"], world.p_blood_named, sum(c.bloody for c in specs))
    assert _within(rates["p_blood_butcher"], world.p_blood_butcher, sum(s["profession"] == "butcher" for s in plain))
    assert _within(rates["p_nude_named"], world.p_nude_named, sum(c.naked for c in specs))
    assert _within(rates["p_nude_base"], world.p_nude_base, sum(c.kind == "figure" and not c.naked for c in specs))
    assert _within(rates["p_artifact"], world.p_artifact, len(specs))
    blood_base_n = sum(not c.bloody and c.profession != "butcher" for c in specs)
    assert _within(rates["p_blood_base"], world.p_blood_base, blood_base_n)
    # the truth masks agree with the scene fields
    has_blood = corpus.mask("blood").flatten(1).any(1)
    assert has_blood.tolist() == [s["blood"] for s in corpus.scenes]


def test_corpus_files_round_trip(tmp_path):
    small = generate_corpus(16, seed=2)
    folder = save_corpus(small, tmp_path / "c", W.DEFAULT_WORLD)
    loaded = load_corpus(folder)
    assert torch.equal(loaded.images, small.images) and torch.equal(loaded.mask_bits, small.mask_bits)
    assert loaded.scenes == small.scenes and loaded.images.dtype == torch.uint8
    assert loaded.images.shape == (16, 3, W.SIZE, W.SIZE)
    from alignment.errors import DataError

    with pytest.raises(DataError, match="no toy-world corpus"):
        load_corpus(tmp_path / "missing")
