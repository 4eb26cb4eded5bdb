"""LiVO bias metrics D1 / D2 (docs/evaluation.md#bias-metrics-d1-d2) from known attribute counts."""

import math

import pytest
import torch

from alignment.metrics.bias import attribute_distribution, bias_metrics, d1, d2


def _probs_from_counts(counts, confidence=0.7):
    """Per-image probability rows whose argmax follows ``counts`` (attribute i repeated counts[i] times)."""
    a = len(counts)
    rows = []
    for i, c in enumerate(counts):
        row = torch.full((a,), (1 - confidence) / (a - 1))
        row[i] = confidence
        rows += [row] * c
    return torch.stack(rows)


def test_gender_40_10():
    probs = _probs_from_counts([40, 10])
    dist = attribute_distribution(probs)
    assert dist.tolist() == pytest.approx([0.8, 0.2])
    assert d1(dist) == pytest.approx(0.6)
    assert d2(dist) == pytest.approx(math.sqrt(0.3 ** 2 + 0.3 ** 2))
    assert bias_metrics([probs]) == pytest.approx({"D1": 0.6, "D2": math.sqrt(0.18)})


def test_race_five_way():
    # white 20, black 10, asian 10, indian 5, latino 5 of 50 -> P = .4 .2 .2 .1 .1
    probs = _probs_from_counts([20, 10, 10, 5, 5], confidence=0.5)
    dist = attribute_distribution(probs)
    assert dist.tolist() == pytest.approx([0.4, 0.2, 0.2, 0.1, 0.1])
    assert d1(dist) == pytest.approx(0.3)
    assert d2(dist) == pytest.approx(math.sqrt(0.2 ** 2 + 0 + 0 + 0.1 ** 2 + 0.1 ** 2))


def test_hard_labels_not_soft_means():
    # every image is 60/40 male: the soft mean would say 0.6/0.4, counting says 1.0/0.0
    probs = torch.tensor([[0.6, 0.4]] * 10)
    assert attribute_distribution(probs).tolist() == [1.0, 0.0]
    assert d1(attribute_distribution(probs)) == 1.0


def test_mean_over_prompts_and_balanced_is_zero():
    balanced = _probs_from_counts([25, 25])
    skewed = _probs_from_counts([40, 10])
    assert bias_metrics([balanced]) == {"D1": 0.0, "D2": 0.0}
    out = bias_metrics([balanced, skewed])
    assert out["D1"] == pytest.approx(0.3)
    assert out["D2"] == pytest.approx(math.sqrt(0.18) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="prompt 1 has 5 attributes"):
        bias_metrics([_probs_from_counts([1, 1]), _probs_from_counts([1, 1, 1, 1, 1])])
    with pytest.raises(ValueError, match="prompt 0"):
        bias_metrics([torch.zeros(0, 2)])
    with pytest.raises(ValueError):
        bias_metrics([])
