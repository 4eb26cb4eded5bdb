"""Method proof on the toy world: HG-DPO (experiment=toy_hg_dpo) — pairs from pools of the base model's own samples
ranked by the toy rater, on the 28 held-out captions no pool shows.

The paper's claims, as the issue states them:

- with the rater as the pool scorer, pools of N = 20 give a higher win rate over the base than N = 2;
- DPO on such pairs shifts the colours (HSV) against the base; the statistic-matching loss L_stat reduces the shift,
  and LAN at inference reduces it further, while the win rate over the base stays above 50 %.

Measured in three runs (training seeds 0, 1, 2; pool seeds 0, 0, 100000; every figure in
experiments/toy_world/NOTES.md#hg-dpo-on-the-toy-world). What held in all three is asserted below (on seed 0); what
held only partly is printed, not asserted (see the notes).

About ten minutes on 2 CPU cores; marked slow, run by CI (``make test``).
"""

from __future__ import annotations

import pytest

from alignment.toy.demo import verdict
from alignment.toy.hg_dpo import format_summary, run_all, total_shift

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    summary = run_all(tmp_path_factory.mktemp("toy_hg_dpo"), seed=0, data_seed=0)
    print("\n" + format_summary(summary))
    return summary


def interval(cell) -> str:
    return f"{100 * cell['rate']:.1f} % [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"


def test_bigger_pools_give_a_higher_win_rate_over_the_base(proof):
    n2, n20 = (proof["win_rate"][name]["toy_preference"] for name in ("n2", "n20"))
    overlap = n20["low"] <= n2["high"]
    print(f"toy_preference win rate over the base: N = 20 {interval(n20)}, N = 2 {interval(n2)}"
          + ("; the intervals overlap" if overlap else ""))
    assert n20["rate"] > n2["rate"], (n20, n2)
    assert verdict(n20) == "+", n20


def test_dpo_shifts_the_colours_and_l_stat_then_lan_take_it_back(proof):
    shift, signed = proof["color_shift"], proof["color_shift_signed"]
    # a measurable shift: a channel whose signed shift has a 95 % interval that excludes 0
    beyond = [c for c, v in signed["n20"].items() if v["low"] > 0 or v["high"] < 0]
    print("signed HSV shift vs base (%): " + "; ".join(
        f"{m}: " + ", ".join(f"{c} {v['value']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]" for c, v in s.items())
        for m, s in signed.items()))
    assert beyond, signed["n20"]
    totals = {m: total_shift(shift[m]) for m in ("n20", "n20_stat", "n20_stat_lan")}
    assert totals["n20_stat"] < totals["n20"], totals
    assert totals["n20_stat_lan"] < totals["n20_stat"], totals


def test_the_win_rate_over_the_base_stays_above_half_with_l_stat_and_lan(proof):
    stat, lan = (proof["win_rate"][name]["toy_preference"] for name in ("n20_stat", "n20_stat_lan"))
    print(f"toy_preference win rate over the base: L_stat {interval(stat)}, L_stat + LAN {interval(lan)}")
    assert verdict(stat) == "+", stat
    assert lan["rate"] > 0.5, lan
