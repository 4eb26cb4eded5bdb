"""Win rate with bootstrap interval (docs/evaluation.md#win-rate): hand-computed cases, interval behaviour, input
errors."""

import pytest
import torch

from alignment.metrics.winrate import WinRate, best_of_k, prompt_outcomes, win_rate, win_rate_table


def test_best_of_k_picks_the_max_per_prompt():
    scores = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.0, -1.0], [-3.0, -2.0, -4.0]])
    assert best_of_k(scores).tolist() == [5.0, 2.0, -2.0]
    assert best_of_k(torch.tensor([0.5, 0.25])).tolist() == [0.5, 0.25]  # 1-D = one image per prompt


def test_two_wins_one_tie_one_loss_is_0625():
    # best of A per prompt: 3, 5, 2, 1 ; best of B: 2, 4, 2, 7  -> win, win, tie, loss
    a = torch.tensor([[3.0, 1.0], [0.0, 5.0], [2.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [4.0, 4.0], [1.0, 2.0], [7.0, 6.0]])
    wr = win_rate(a, b, num_bootstrap=500)
    assert isinstance(wr, WinRate)
    assert wr.rate == pytest.approx(0.625)
    assert (wr.wins, wr.ties, wr.losses, wr.num_prompts) == (2, 1, 1, 4)
    assert prompt_outcomes(a, b).tolist() == [1.0, 1.0, 0.5, 0.0]
    assert win_rate(b, a, num_bootstrap=0).rate == pytest.approx(0.375)


def test_compares_best_of_k_not_means():
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0]])   # mean 2, best 10
    b = torch.tensor([[5.0, 5.0, 5.0, 5.0, 5.0]])    # mean 5, best 5
    assert win_rate(a, b, num_bootstrap=0).rate == 1.0


def test_reduce_mean_compares_the_mean_of_the_k_scores():
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0],    # mean 2, best 10
                      [4.0, 4.0, 4.0, 4.0, 4.0],     # mean 4 = b's mean: a tie
                      [1.0, 2.0, 3.0, 4.0, 5.0]])    # mean 3 > 2.8
    b = torch.tensor([[5.0, 5.0, 5.0, 5.0, 5.0],
                      [0.0, 8.0, 4.0, 4.0, 4.0],
                      [0.0, 0.0, 0.0, 9.0, 5.0]])
    assert prompt_outcomes(a, b, reduce="mean").tolist() == [0.0, 0.5, 1.0]
    assert prompt_outcomes(a, b).tolist() == [1.0, 0.0, 0.0]  # best of k: 10>5, 4<8, 5<9
    assert win_rate(a, b, num_bootstrap=0, reduce="mean").rate == pytest.approx(0.5)
    rows = win_rate_table({"a": {"s": a}, "b": {"s": b}}, num_bootstrap=0, reduce="mean")
    assert rows[0]["rate"] == pytest.approx(0.5) and rows[1]["rate"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reduce must be one of best, mean, got 'median'"):
        win_rate(a, b, reduce="median")


def test_identical_inputs_give_exactly_half():
    s = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    wr = win_rate(s, s.clone())
    assert wr.rate == 0.5 and wr.low == 0.5 and wr.high == 0.5 and wr.ties == 30


def test_interval_contains_rate_is_deterministic_and_shrinks_with_more_prompts():
    gen = torch.Generator().manual_seed(0)

    def scores(p):
        a = torch.randn(p, 5, generator=gen) + 0.3  # A is somewhat better
        b = torch.randn(p, 5, generator=gen)
        return a, b

    small, large = scores(20), scores(2000)
    wr_small, wr_large = win_rate(*small, seed=3), win_rate(*large, seed=3)
    for wr in (wr_small, wr_large):
        assert wr.low <= wr.rate <= wr.high
        assert 0.0 <= wr.low < wr.high <= 1.0
    assert (wr_large.high - wr_large.low) < 0.5 * (wr_small.high - wr_small.low)
    assert win_rate(*small, seed=3) == wr_small  # same seed -> same interval
    # a wider confidence gives a wider interval
    wide = win_rate(*small, seed=3, confidence=0.99)
    assert wide.low <= wr_small.low and wide.high >= wr_small.high


def test_all_wins_interval_is_degenerate():
    wr = win_rate(torch.ones(10, 2), torch.zeros(10, 2), num_bootstrap=100)
    assert (wr.rate, wr.low, wr.high) == (1.0, 1.0, 1.0)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 3\)"):
        win_rate(torch.zeros(4, 5), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3, 5\)"):
        win_rate(torch.zeros(4, 5), torch.zeros(3, 5))


def test_bad_values_and_arguments():
    with pytest.raises(ValueError, match="non-finite"):
        win_rate(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="confidence"):
        win_rate(torch.zeros(2, 1), torch.zeros(2, 1), confidence=95)
    with pytest.raises(ValueError, match="non-empty"):
        win_rate(torch.zeros(0, 5), torch.zeros(0, 5))
    wr = win_rate(torch.zeros(2, 1), torch.zeros(2, 1), num_bootstrap=0)
    assert wr.rate == 0.5 and wr.low != wr.low  # NaN interval when no bootstrap


def test_table_covers_ordered_pairs_and_shared_scorers():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "base": {"pickscore": torch.randn(12, 5, generator=gen), "hps": torch.randn(12, 5, generator=gen)},
        "dpo": {"pickscore": torch.randn(12, 5, generator=gen), "hps": torch.randn(12, 5, generator=gen)},
        "ours": {"pickscore": torch.randn(12, 5, generator=gen), "hps": torch.randn(12, 5, generator=gen),
                 "aesthetic": torch.randn(12, 5, generator=gen)},
    }
    rows = win_rate_table(scores, num_bootstrap=200)
    assert len(rows) == 3 * 2 * 2  # ordered pairs x shared scorers ("aesthetic" is only in one model)
    assert {r["scorer"] for r in rows} == {"pickscore", "hps"}
    assert rows[0]["model_a"] == "base" and rows[0]["model_b"] == "dpo" and rows[0]["scorer"] == "pickscore"
    index = {(r["model_a"], r["model_b"], r["scorer"]): r for r in rows}
    for (a, b, s), r in index.items():
        assert r["rate"] + index[(b, a, s)]["rate"] == pytest.approx(1.0)
        assert r["rate"] == win_rate(scores[a][s], scores[b][s], num_bootstrap=0).rate
        assert set(r) >= {"rate", "low", "high", "wins", "ties", "losses", "num_prompts"}


def test_table_names_the_pair_on_bad_shapes():
    scores = {"a": {"clip": torch.zeros(3, 5)}, "b": {"clip": torch.zeros(4, 5)}}
    with pytest.raises(ValueError, match="a vs b on clip"):
        win_rate_table(scores)
