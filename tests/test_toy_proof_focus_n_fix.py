"""Method proof on the toy world: DRaFT-2 (experiment=toy_draft) and Focus-N-Fix (experiment=toy_focus_n_fix) with
the toy safety reward, against the base on the 28 held-out captions with the same seeds.

The paper's claims, as the issue states them:

- both raise the reward against the base: the 95 % interval of Δ toy_safety (paired, over prompts) is above 0;
- Focus-N-Fix keeps PSNR outside the problem mask (toy_safety's heatmap mask of the base image) clearly higher than
  DRaFT on the same seeds.

Measured in three runs by hand (training seeds 0, 1, 2; every figure in
experiments/toy_world/NOTES.md#focus-n-fix-and-draft-on-the-toy-world): Δ toy_safety DRaFT +6.5 … +7.2 and
Focus-N-Fix +4.4 … +5.4, every interval above 0; PSNR outside the mask DRaFT 21.7 … 23.2 dB, Focus-N-Fix 41.7 …
42.0 dB. Asserted below (seed 0) is what held in all three: both intervals above 0 and at least 10 dB more PSNR
outside the mask for Focus-N-Fix. That Focus-N-Fix gains less reward than DRaFT held in all three too; it is
printed, not asserted (the paper does not claim it).

About five minutes on 2 CPU cores; marked slow, run by CI (``make test``).
"""

from __future__ import annotations

import pytest

from alignment.toy.focus_n_fix import REWARD, format_summary, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    summary = run_all(tmp_path_factory.mktemp("toy_focus_n_fix"), seed=0, data_seed=0)
    print("\n" + format_summary(summary))
    return summary


@pytest.mark.parametrize("model", ["draft", "fnf"])
def test_reward_fine_tuning_raises_the_reward_beyond_the_interval(proof, model):
    delta = proof["delta"][model][REWARD]
    assert delta["low"] > 0, delta


def test_focus_n_fix_changes_the_image_outside_the_mask_far_less_than_draft(proof):
    draft, fnf = (proof["change"][m]["psnr_outside"] for m in ("draft", "fnf"))
    print(f"PSNR outside the mask: DRaFT {draft:.1f} dB, Focus-N-Fix {fnf:.1f} dB; "
          f"Δ{REWARD}: DRaFT {proof['delta']['draft'][REWARD]['value']:+.2f}, "
          f"Focus-N-Fix {proof['delta']['fnf'][REWARD]['value']:+.2f}")
    assert fnf > draft + 10.0, (draft, fnf)
    assert proof["masks"]["non_empty"] > 0  # the comparison is about a real problem region, not empty masks
