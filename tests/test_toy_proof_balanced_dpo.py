"""Method proof on the toy world: BalancedDPO (majority vote of the toy quality ensemble) against the same component
labelled by one scorer at a time (the paper's single-scorer rows), on the 28 held-out captions no training pair shows.

The paper's claim, as the issue states it: the vote beats the base on a majority of the ensemble's scorers at once,
while each single-scorer run wins on its own scorer and loses ground on another. Measured in three runs (training
seeds 0, 1, 2; pair seeds 0, 0, 100000; every figure in experiments/toy_world/NOTES.md#balanceddpo-on-the-toy-world).
What held in all three, and is asserted below (on seed 0):

- the vote beats the base beyond the 95 % interval on toy_centring and toy_contrast, and loses beyond its interval
  on none of the four quality scorers, nor on the world's rater, artifacts or safety;
- DPO on toy_contrast alone wins on contrast and loses on toy_colour and on the world's rater beyond the interval;
  DPO on toy_centring alone wins on centring.

What held only partly, reported rather than asserted:

- "a majority": the vote won 3 of 4 (colour too) in 1 of 3 runs, 2 of 4 in the others. toy_shape cannot show a win
  beyond the interval on these captions (the base is exactly right on 27 of 28; the vote brings the 28th to the
  ceiling: 1/27/0), and toy_colour moves little under any rule;
- centring alone lost on colour in 2 of 3 runs (not in the third: 71.4 % [53.6, 89.3] there);
- colour alone never won on colour beyond its interval (64.3 %, 67.9 %, 60.7 %, each interval touching 50 %), and
  shape alone cannot (ties).

About ten minutes on 2 CPU cores; marked slow, run by CI (``make test``).
"""

from __future__ import annotations

import pytest

from alignment.toy.balanced import EVAL_SCORERS, QUALITY, format_summary, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proof(tmp_path_factory, data_dir):
    # data_dir: the session's ALIGNMENT_DATA_DIR, so the toy pairs are built once (and shared with other tests)
    summary = run_all(tmp_path_factory.mktemp("toy_balanced_dpo"), seed=0, data_seed=0)
    print("\n" + format_summary(summary))
    return summary


def above(cell) -> bool:
    return cell["low"] > 0.5


def below(cell) -> bool:
    return cell["high"] < 0.5


def test_the_vote_improves_centring_and_contrast_and_loses_on_no_quality_scorer(proof):
    vote = proof["win_rate"]["vote"]
    assert above(vote["toy_centring"]) and above(vote["toy_contrast"]), vote     # seed 0: 100 % and 89.3 %
    for name in QUALITY:
        assert not below(vote[name]), (name, vote[name])
    wins = [name for name in QUALITY if above(vote[name])]
    # the paper's "majority of the ensemble" (3 of 4) did not reproduce: 2 of 4, in every measured run (NOTES)
    print(f"vote wins beyond the interval on {len(wins)} of {len(QUALITY)} quality scorers: {wins}")
    assert len(wins) >= 2


def test_single_scorer_dpo_wins_its_own_scorer_and_contrast_alone_gives_ground(proof):
    for name in ("toy_centring", "toy_contrast"):
        single = proof["win_rate"][f"single_{name}"]
        assert above(single[name]), (name, single[name])
    contrast = proof["win_rate"]["single_toy_contrast"]
    for name in ("toy_colour", "toy_preference"):           # over-optimising contrast (seed 0: 21.4 %, 7.1 %)
        assert below(contrast[name]), (name, contrast[name])
    # the vote keeps what contrast alone gives away, and loses nothing else beyond its interval either
    vote = proof["win_rate"]["vote"]
    for name in ("toy_colour", "toy_preference", "toy_artifacts", "toy_safety"):
        assert not below(vote[name]), (name, vote[name])
    for name in QUALITY:   # reported: which single-scorer runs gave ground where (NOTES has all three runs)
        single = proof["win_rate"][f"single_{name}"]
        print(f"single_{name}: own {100 * single[name]['rate']:.1f} %; below the base on "
              f"{[o for o in EVAL_SCORERS if below(single[o])]}")


def test_labels_are_logged_and_the_ge_rule_tilts_toward_the_first_image(proof):
    labels = proof["labels"]["vote"]
    assert labels["pairs"] == 896 and labels["kept"] + labels["ties_dropped"] == 896
    # toy_shape is exactly tied on most pairs of base samples: under the paper's ≥ rule each of those is a vote for
    # x¹, so most kept labels prefer x¹ (seed 0: 80.9 %; with scorer_ties=abstain 52.8 %, NOTES)
    assert labels["exact_ties/toy_shape"] > 0.9 * 896
    assert labels["first_preferred_fraction"] > 0.7
    for name in QUALITY:
        assert 0.5 < labels[f"agreement/{name}"] <= 1.0
    assert set(proof["win_rate"]) == {"vote", *(f"single_{n}" for n in QUALITY)}
    assert set(proof["win_rate"]["vote"]) == set(EVAL_SCORERS)
