"""Method-family proof on the toy world: Diffusion-DPO (and, as its control, DPO on one quality metric alone).

Trains exactly what ``make demo`` trains (``experiment=toy_dpo``: LoRA DPO on pairs of the base model's own samples
labelled by ``toy_preference``) on fixed seeds, then checks on the 28 held-out captions — which no training pair
shows — that the aligned model beats the base on the rater beyond the 95 % bootstrap interval. About two minutes on
2 CPU cores; marked slow, run by CI (``make test``). Later method issues add ``test_toy_proof_<family>.py`` beside it.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from alignment.toy.demo import JUDGE, run_demo
from alignment.toy.pairs import split_captions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_dpo_demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNMENT_DATA_DIR", str(out / "data"))  # the pairs are generated here, not shared
    try:
        summary = run_demo(out, logger="none")
    finally:
        mp.undo()
    return out, summary


def test_dpo_beats_the_base_on_held_out_captions_beyond_the_interval(demo):
    out, summary = demo
    wr = summary["win_rate"]
    print(f"toy DPO vs base ({JUDGE}, mean of {summary['images_per_prompt']} seeds per prompt): "
          f"{100 * wr['rate']:.1f}% [{100 * wr['low']:.1f}, {100 * wr['high']:.1f}] W/T/L "
          f"{wr['wins']}/{wr['ties']}/{wr['losses']}; mean {summary['mean']['base'][JUDGE]:.3f} -> "
          f"{summary['mean']['dpo'][JUDGE]:.3f}")
    assert summary["num_prompts"] == 28 and summary["images_per_prompt"] == 8
    assert wr["low"] > 0.5, wr  # measured: 89.3 % [78.6, 100]
    assert summary["mean"]["dpo"][JUDGE] > summary["mean"]["base"][JUDGE]
    # the rater's flaw terms move the right way too: fewer artifacts, less unrequested blood/nudity
    assert summary["mean"]["dpo"]["toy_artifacts"] > summary["mean"]["base"]["toy_artifacts"]
    # the reverse comparison is the complement (no ties on continuous scores)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    reverse = next(r for r in metrics["win_rate"]["rows"]
                   if (r["model_a"], r["model_b"], r["scorer"]) == ("base", "dpo", JUDGE))
    assert reverse["rate"] == pytest.approx(1 - wr["rate"]) and reverse["high"] < 0.5
    assert metrics["win_rate"]["reduce"] == "mean"
    # the best-of-k win rate (docs/evaluation.md#win-rate) on the same images is reported beside it (measured 67.9 %
    # [50.0, 85.7])
    best = summary["win_rate_best_of_k"]
    assert 0.5 < best["rate"] < wr["rate"] and best["num_prompts"] == 28


def test_training_saw_only_training_captions_and_learned_the_pairs(demo):
    out, _ = demo
    files = list((out / "data" / "toy_pairs").glob("pairs-*.parquet"))
    assert len(files) == 1
    captions = set(pq.read_table(files[0], columns=["caption"]).column("caption").to_pylist())
    train, heldout = split_captions()
    assert captions == set(train) and not captions & set(heldout)
    assert (out / "heldout_prompts.txt").read_text().split("\n")[:-1] == heldout
    steps = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "implicit_acc" in s]
    first, last = steps[:50], steps[-50:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    # DPO's own signal: the implicit reward ranks the training pairs better at the end than at the start
    assert mean(last, "implicit_acc") > mean(first, "implicit_acc") + 0.05  # measured .61 -> .73
    assert mean(last, "loss") < mean(first, "loss")


@pytest.fixture(scope="module")
def contrast_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_dpo_contrast")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNMENT_DATA_DIR", str(out / "data"))
    try:
        # the same recipe, labels from one quality scorer alone (tie margin in its units: ~15 on base samples)
        summary = run_demo(out, ["dataset.generate.judge=toy_contrast", "dataset.generate.tie_margin=0.5"],
                           logger="none")
    finally:
        mp.undo()
    return summary


def test_single_metric_dpo_over_optimises_that_metric(contrast_only):
    """The world's quality trade-off (what BalancedDPO's vote is for): DPO on toy_contrast alone wins on contrast and
    loses on the rater, on artifacts and on unrequested toxicity, each beyond its interval. Measured: contrast 100 %
    [100, 100], toy_preference 14.3 % [3.6, 28.6], artifacts 0 %, safety 14.3 % (heads drawn darker, dark spots)."""
    per = contrast_only["per_scorer"]
    assert per["toy_contrast"]["low"] > 0.5
    for name in (JUDGE, "toy_artifacts", "toy_safety"):
        assert per[name]["high"] < 0.5, (name, per[name])
    assert contrast_only["mean"]["dpo"][JUDGE] < contrast_only["mean"]["base"][JUDGE] - 0.05
