"""The toy world's LiVO data (alignment.toy.livo.ToyValueBuilder), its held-out prompt sets, and the paired image
bootstrap the LiVO proof reports its intervals with. The proof itself is tests/test_toy_proof_livo.py (slow)."""

from __future__ import annotations

import pytest
import torch

from alignment.errors import ConfigError


@pytest.fixture(scope="module")
def builder():
    from alignment.toy.livo import ToyValueBuilder

    return ToyValueBuilder(images_per_prompt=4)


def test_bias_labels_prefer_the_under_represented_attribute(builder):
    from alignment.toy.livo import under_represented
    from alignment.toy.world import DEFAULT_WORLD, parse_caption

    assert under_represented({"male": 0.85, "female": 0.15}) == (["female"], ["male"])
    assert under_represented({"a": 0.6, "b": 0.16, "c": 0.1, "d": 0.08, "e": 0.06}) == (["b", "c", "d", "e"], ["a"])
    seen = set()
    for item in range(builder.num_items()):
        caption, value, category, label, scene = builder.scene(item)
        spec = parse_caption(caption)
        if value == "gender equality":
            assert spec.gender is None
            majority = "male" if DEFAULT_WORLD.p_male[spec.profession] > 0.5 else "female"
            assert (scene.gender != majority) == bool(label), (caption, scene.gender, label)
            assert scene.tone == (spec.tone or scene.tone)
        elif value == "racial equality":
            assert spec.tone is None and scene.gender == (spec.gender or scene.gender)
            assert (scene.tone != "pale") == bool(label), (caption, scene.tone, label)
        else:
            assert category == "toxicity" and (spec.bloody or spec.naked)
            flaw = scene.nude if spec.naked else scene.blood
            assert flaw == (not label) and not (scene.nude and scene.blood)
        seen.add(value)
    assert seen == {"gender equality", "racial equality", "bloody considered inappropriate",
                    "nudity considered inappropriate"}


def test_no_heldout_caption_is_trained_on(builder):
    from alignment.toy.livo import heldout_prompt_sets

    trained = {caption for caption, _, _ in builder.plan}
    heldout = {row["prompt"] for rows in heldout_prompt_sets().values() for row in rows}
    assert trained and heldout and not trained & heldout


def test_the_data_loads_as_livo_pairs(tmp_path, builder):
    from alignment.builders.runner import build
    from alignment.data.livo import ValuePairs

    result = build(builder, tmp_path, progress=False)
    pairs = ValuePairs(result.path, resolution=32)
    assert len(pairs) == builder.num_items() // 2 and pairs.num_unpaired_groups == 0
    caption, value, _, _, _ = builder.scene(0)
    item = pairs[0]
    assert item["caption"] == caption and item["extras"] == {"value": value}
    assert item["pixel_values_w"].shape == (3, 32, 32)


def test_bad_settings_are_named():
    from alignment.toy.livo import ToyValueBuilder

    with pytest.raises(ConfigError, match="dataset.generate.images_per_prompt must be even"):
        ToyValueBuilder(images_per_prompt=3)
    with pytest.raises(ConfigError, match="dataset.generate.split must be"):
        ToyValueBuilder(split="test")
    with pytest.raises(ConfigError, match="applies to a toy caption"):
        ToyValueBuilder(values=["zombie considered inappropriate"])


def test_paired_seed_bootstrap_resamples_the_same_images_of_both_models():
    from alignment.metrics.bias import bias_metrics
    from alignment.metrics.winrate import paired_seed_bootstrap

    g = torch.Generator().manual_seed(0)
    balanced = [torch.eye(2)[torch.arange(32) % 2] for _ in range(3)]                    # D1 = 0 per prompt
    skewed = [torch.eye(2)[(torch.rand(32, generator=g) < 0.1).long()] for _ in range(3)]  # mostly attribute 0
    out = paired_seed_bootstrap(lambda per: bias_metrics(per)["D1"], balanced, skewed, num_bootstrap=300)
    assert out["model"]["value"] == 0.0 and out["reference"]["value"] > 0.6
    assert out["delta"]["high"] < 0 and out["delta"]["low"] <= out["delta"]["value"] <= out["delta"]["high"]
    same = paired_seed_bootstrap(lambda per: bias_metrics(per)["D1"], skewed, skewed, num_bootstrap=100)
    assert same["delta"] == {"value": 0.0, "low": 0.0, "high": 0.0}   # paired: identical models never differ
    with pytest.raises(ValueError, match="prompt 0: 32 model images but 5"):
        paired_seed_bootstrap(len, skewed, [s[:5] for s in skewed])


def test_run_steps_runs_in_parallel_and_names_the_failing_log(tmp_path):
    from alignment.errors import TrainingError
    from alignment.toy.demo import run_steps

    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    steps = [(["json.tool", str(good)], tmp_path / "one.log"), (["json.tool", str(good)], tmp_path / "two.log")]
    run_steps(steps, parallel=2)
    assert all('"a": 1' in log.read_text() for _, log in steps)
    with pytest.raises(TrainingError, match=r"json.tool failed \(exit \d+\); full log in .*bad.log"):
        run_steps([(["json.tool", str(tmp_path / "missing.json")], tmp_path / "bad.log"), *steps], parallel=2)
