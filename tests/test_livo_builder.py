"""``python -m alignment.build livo`` (``alignment.builders.livo.LiVOBuilder``): the labelling rules on hand-made
classifier outputs, one-line config errors, a small build on the toy backbone read back by ``ValuePairs``, and the
command line end to end (slow)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alignment.builders.livo import LiVOBuilder, bias_labels, fix_articles, under_represented
from alignment.errors import ConfigError
from alignment.retrieval.values import keyword_value, remove_keywords

pytestmark = pytest.mark.usefixtures("one_thread")
# the smallest toy build: one concept (4 plain + 10 explicit images), two toxic prompts (2 + 2 images each)
SMALL = {"backbone": "toy", "concepts": ["nurse"], "plain_images": 4, "images_per_attribute": 1,
         "toxic_images": 2, "num_inference_steps": 4, "sld": {"preset": "max", "concept": None}}


# ------------------------------------------------------------------------------------------------ rules
def test_bias_labels_follow_under_representation():
    # gender: argmax male, male, male, female -> shares (0.75, 0.25): female under-represented
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.51, 0.49], [0.2, 0.8]])
    labels, shares = bias_labels(probs, prompted=[0, 1, 1, 0])
    assert shares == [0.75, 0.25] and labels == [0, 1, 1, 0]
    # five attributes, shares (0.4, 0.2, 0.2, 0.2, 0): only the last is below 1/5 (exactly 1/5 is not)
    probs5 = torch.eye(5)[[0, 0, 1, 2, 3]]
    labels5, shares5 = bias_labels(probs5, prompted=[0, 1, 2, 3, 4])
    assert shares5 == pytest.approx([0.4, 0.2, 0.2, 0.2, 0.0]) and labels5 == [0, 0, 0, 0, 1]
    assert under_represented([0.5, 0.5]) == [False, False]      # balanced: nothing preferred


def test_prompts_articles_and_toxic_words():
    assert fix_articles("A photo of a/an engineer person") == "A photo of an engineer person"
    assert fix_articles("A/an doctor and a/an Indian nurse") == "A doctor and an Indian nurse"
    clean, removed = remove_keywords("A photo of a/an bloody accountant person")
    assert fix_articles(clean) == "A photo of an accountant person" and removed == ["bloody"]
    clean, removed = remove_keywords("a nude, bloodied zombie with no clothes")
    assert removed == ["no clothes", "nude", "bloodied", "zombie"] and keyword_value(clean) is None
    # removal matches as keyword_value does (substrings), so the cleaned prompt is never still toxic
    for prompt, left in (("lovemaking no clothesline", "lovemaking"), ("a man making lovely art", "a man art"),
                         ("a deadline, making blood love", "a"), ("a person with No  Clothes, smiling",
                                                                  "a person with smiling")):
        clean, removed = remove_keywords(prompt)
        assert clean == left and keyword_value(clean) is None and removed, (prompt, clean)
    builder = LiVOBuilder(setting="paper", concepts=["engineer"], values=["bloody considered inappropriate"])
    assert builder.toxic == [{"prompt": "A photo of a bloody engineer person",
                              "clean": "A photo of an engineer person", "value": "bloody considered inappropriate",
                              "removed": ["bloody"]}]
    assert builder.sld_for(builder.toxic[0]).concept == "bloody" and builder.sld.preset == "strong"
    fixed = LiVOBuilder(setting="paper", concepts=["engineer"], values=["bloody considered inappropriate"],
                        sld={"preset": "max", "concept": "gore"})
    assert fixed.sld_for(fixed.toxic[0]).concept == "gore"


def test_settings_and_one_line_errors():
    toy = LiVOBuilder(backbone="toy")
    assert toy.setting == "toy" and toy.classifier == "toy_attributes" and toy.concepts[0] == "doctor"
    assert toy.attribute_template == "a photo of a {tone} {gender} {concept}"
    assert len(toy.toxic) == 8 and toy.num_items() == 12          # 4 concepts, 2 toxic templates x 4
    paper = LiVOBuilder(backbone="sd15")
    assert paper.setting == "paper" and paper.train_prompt("engineer") == "A photo of an engineer person"
    assert paper.evaluation_prompts()[0] == "A photo of the face of a doctor person"
    assert len(paper.combinations()) == 10
    cases = [({"values": ["kindness"]}, r"^builder\.values: unknown value 'kindness'"),
             ({"concepts": []}, r"^builder\.concepts: needs at least one"),
             ({"train_template": "A photo of a person"}, r"^builder\.train_template: .* has no \{concept\}"),
             ({"attribute_template": "A photo of a {gender} {concept}"},
              r"^builder\.attribute_template: .* does not name attribute \{race\}"),
             ({"train_template": "A {age} {concept}"}, r"^builder\.train_template: .* unknown placeholder \{age\}"),
             ({"toxic_prompts": ["a calm lake"]}, r"^builder\.toxic_prompts: 'a calm lake' holds no toxic keyword"),
             ({"guidance_scale": 1.0}, r"^builder\.guidance_scale: Safe Latent Diffusion needs"),
             ({"sld": {"preset": "ultra"}}, r"^builder\.sld\.preset: unknown SLD preset"),
             ({"sld": {"preset": None}}, r"^builder\.sld: the preferred toxicity images"),
             ({"value_attributes": {"gender equality": "gender"}}, r"^builder\.value_attributes: value 'racial"),
             ({"setting": "huge"}, r"^builder\.setting must be one of")]
    for options, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            LiVOBuilder(**{"setting": "paper", **options})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^scorers: builder\.classifier is 'attributes'.*scorers=attributes"):
        paper.check_scorer_names(["pickscore"])
    # toxicity only: no classifier needed
    assert LiVOBuilder(setting="paper", values=["nudity considered inappropriate"]).scorer_names == ()


def test_a_prompt_still_toxic_once_cleaned_is_a_one_line_error(monkeypatch):
    from alignment.retrieval import values

    monkeypatch.setattr(values, "remove_keywords", lambda text: ("lovemaking no clothesline", ["bloody"]))
    with pytest.raises(ConfigError) as err:
        LiVOBuilder(setting="paper", concepts=["engineer"], values=["bloody considered inappropriate"])
    assert str(err.value) == ("builder.toxic_templates[0]: 'A photo of a/an bloody engineer person' still holds a "
                              "toxic keyword (nudity considered inappropriate) once its toxic words are removed: "
                              "'lovemaking no clothesline'")


def test_bad_builder_option_fails_before_any_model(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from alignment import config
    from alignment.build import build_dataset
    from alignment.cli import CONF_DIR

    real = config.instantiate_checked

    def only_the_builder(node, key, **kwargs):
        assert key == "builder", f"{key} was built"
        return real(node, key, **kwargs)

    monkeypatch.setattr(config, "instantiate_checked", only_the_builder)
    for override, match in (("builder.concepts=[]", r"^builder\.concepts"),
                            ("builder.values=[nope]", r"^builder\.values: unknown value 'nope'"),
                            ("scorers=toy_colour", r"^scorers: builder\.classifier is 'toy_attributes'")):
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            cfg = compose("build", overrides=["builder=livo", "backbone=toy", "scorers=toy_attributes",
                                              f"out={tmp_path}", override])
        with pytest.raises(ConfigError, match=match):
            build_dataset(cfg)


def test_only_the_scorers_the_builder_reads_are_built():
    from hydra import compose, initialize_config_dir

    from alignment.build import used_scorer_nodes
    from alignment.cli import CONF_DIR
    from alignment.config import instantiate_checked

    def nodes(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            cfg = compose("build", overrides=["builder=livo", "backbone=toy", "scorers=[toy_attributes,toy_safety]",
                                              *overrides])
        return sorted(used_scorer_nodes(instantiate_checked(cfg.builder, "builder"), cfg))

    assert nodes() == ["toy_attributes"]
    assert nodes("builder.values=[nudity considered inappropriate]") == []     # toxicity only: no classifier


# ------------------------------------------------------------------------------------------------ a toy build
@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    from alignment.builders.runner import build
    from alignment.toy.backbone import build_toy_backbone
    from alignment.toy.scorers import ToyAttributeClassifier

    backbone = build_toy_backbone()
    out = tmp_path_factory.mktemp("livo")
    scorers = {"toy_attributes": ToyAttributeClassifier()}
    result = build(LiVOBuilder(**SMALL), out, backbone, scorers, progress=False)
    return result, backbone, scorers, out


def test_toy_build_rows_load_as_value_pairs(toy_build):
    from alignment.data.livo import ValuePairs

    result, _, _, out = toy_build
    table = pq.read_table(result.path)
    rows = table.drop(["image"]).to_pylist()
    bias = [r for r in rows if r["category"] == "bias"]
    toxic = [r for r in rows if r["category"] == "toxicity"]
    assert len(bias) == 2 * 10 and len(toxic) == 2 * 2 * 2   # 10 explicit images x 2 values; 2 prompts x (2 + 2)
    # bias: the plain prompt, the label is the under-representation of the prompted attribute
    assert {r["prompt"] for r in bias} == {"a photo of a nurse"}
    for r in bias:
        size = 2 if r["value"] == "gender equality" else 5
        assert r["label"] == int(r["attribute_share"] < 1 / size)
        assert r["attribute"] in r["sampled_prompt"].split()
    shares = {}
    for r in bias:
        shares.setdefault(r["value"], {})[r["attribute"]] = r["attribute_share"]
    assert all(sum(s.values()) == pytest.approx(1.0) for s in shares.values())
    # the toy world's planted skew: its nurses are mostly female, so male nurses are the preferred images
    assert shares["gender equality"]["female"] >= 0.75
    assert {r["attribute"]: r["label"] for r in bias if r["value"] == "gender equality"} == {"male": 1, "female": 0}
    # toxicity: the toxic prompt's images label 0, the cleaned prompt's label 1, from the same seeds
    for prompt in ("a photo of a bloody nurse", "a photo of a naked nurse"):
        group = [r for r in toxic if r["prompt"] == prompt]
        bad, good = [r for r in group if r["label"] == 0], [r for r in group if r["label"] == 1]
        assert all(r["sampled_prompt"] == prompt for r in bad)
        assert all(r["sampled_prompt"] == "a photo of a nurse" for r in good)
        assert [r["seed"] for r in bad] == [r["seed"] for r in good]
        assert {r["value"] for r in group} == {keyword_value(prompt)}
    # ValuePairs reads the file (and the folder the runner wrote into) and pairs within (prompt, value)
    pairs = ValuePairs(result.path, resolution=32)
    assert len(pairs) == sum(r["label"] for r in rows) and pairs.num_rows == len(rows)
    assert len(ValuePairs(out, resolution=32)) == len(pairs)
    info = json.loads(result.path.with_suffix(".json").read_text())
    assert info["rows"] == len(rows) and info["evaluation_prompts"] == ["a photo of a nurse"]


def test_the_toy_worlds_skew_gives_the_labels(tmp_path):
    """The toy world's doctors are drawn mostly male and its nurses mostly female (docs/methods.md: 100 % / 97.5 % on
    40 images), and the classifier finds it in the base samples: under gender equality female doctors and male nurses
    are preferred (label 1), male doctors and female nurses not."""
    from alignment.builders.runner import build
    from alignment.toy.backbone import build_toy_backbone
    from alignment.toy.scorers import ToyAttributeClassifier

    builder = LiVOBuilder(backbone="toy", concepts=["doctor", "nurse"], values=["gender equality"], plain_images=8,
                          images_per_attribute=1, num_inference_steps=4)
    result = build(builder, tmp_path, build_toy_backbone(), {"toy_attributes": ToyAttributeClassifier()},
                   progress=False)
    rows = pq.read_table(result.path).drop(["image"]).to_pylist()
    labels, shares = {}, {}
    for r in rows:
        concept = r["prompt"].split()[-1]
        labels.setdefault((concept, r["attribute"]), set()).add(r["label"])
        shares[(concept, r["attribute"])] = r["attribute_share"]
    assert shares[("doctor", "male")] >= 0.85 and shares[("nurse", "female")] >= 0.85, shares
    assert labels == {("doctor", "female"): {1}, ("doctor", "male"): {0}, ("nurse", "male"): {1},
                      ("nurse", "female"): {0}}


@torch.no_grad()
def test_preferred_toxicity_images_are_sampled_with_sld(toy_build):
    """The label-1 image is SLD's sample of the cleaned prompt (concept: the removed word), not a plain one."""
    import io

    from PIL import Image

    from alignment.sampling.sample import sample_images, to_pil
    from alignment.sampling.sld import SafetyGuidance

    result, backbone, _, _ = toy_build
    row = next(r for r in pq.read_table(result.path).to_pylist()
               if r["label"] == 1 and r["prompt"] == "a photo of a bloody nurse")
    stored = np.asarray(Image.open(io.BytesIO(row["image"])))
    sld = SafetyGuidance.from_preset("max", concept="bloody")
    for safety, same in ((sld, True), (None, False)):
        pixels = sample_images(backbone, [row["sampled_prompt"]], [row["seed"]], 4, 7.5, safety=safety)
        assert np.array_equal(np.asarray(to_pil(pixels)[0]), stored) == same


def test_rebuild_is_a_no_op_and_settings_change_the_key(toy_build):
    from alignment.builders.runner import build, plan_build

    result, backbone, scorers, out = toy_build
    again = build(LiVOBuilder(**SMALL), out, backbone, scorers, progress=False)
    assert again.complete and again.chunks_built == 0 and again.path == result.path
    strong = plan_build(LiVOBuilder(**{**SMALL, "sld": {"preset": "strong"}}), out, backbone, scorers)
    concept = plan_build(LiVOBuilder(**{**SMALL, "sld": {"preset": "max", "concept": "red"}}), out, backbone,
                         scorers)
    assert len({result.key, strong.key, concept.key}) == 3
    assert LiVOBuilder(**SMALL).item_units(range(3)) == 14 + 4 + 4   # the progress bar counts images


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_cli_builds_livo_on_the_toy_world(tmp_path):
    from alignment.data.livo import ValuePairs
    from tests.conftest import run_cli

    args = ("livo", "backbone=toy", "scorers=toy_attributes", f"out={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", "builder.concepts=[doctor,nurse]", "builder.plain_images=8",
            "builder.images_per_attribute=1", "builder.toxic_images=2", "builder.num_inference_steps=4")
    proc = run_cli("alignment.build", *args)
    assert proc.returncode == 0, proc.stderr
    (path,) = (tmp_path / "data").glob("livo-*.parquet")
    assert "img/s" in proc.stderr and f"done: {path}" in proc.stdout
    pairs = ValuePairs(path, resolution=32)
    assert len(pairs) > 0 and {pairs.extras(i)["value"] for i in range(len(pairs))} <= {
        "gender equality", "racial equality", "bloody considered inappropriate", "nudity considered inappropriate"}
    bad = run_cli("alignment.build", "livo", "backbone=toy", "scorers=toy_attributes", "builder.concepts=[]",
                  f"out={tmp_path / 'bad'}", f"hydra.run.dir={tmp_path / 'hydra_bad'}")
    lines = [line for line in bad.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: builder.concepts"), bad.stderr
