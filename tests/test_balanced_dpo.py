"""BalancedDPO (alignment/objectives/balanced_dpo.py, docs/methods.md#balanceddpo): the label rules against hand-made
cases, the cached pair scores, the reference refresh, the per-step rules' loss, bad input, and short CLI runs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignment.errors import ConfigError
from alignment.objectives.balanced_dpo import (BalancedDPO, EnsembleLabeller, loss_sum, majority_vote, resolve_ties,
                                               scorer_votes, sum_vote, z_scores)
from alignment.scorers.base import Scorer
from tests.conftest import FAST_RUN, run_cli


def logsig(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


# ------------------------------------------------------------------------------------------------ label rules
def test_scorer_votes_follow_the_ge_rule_or_abstain_on_exact_ties():
    s1 = np.array([[1.0, 2.0], [3.0, 3.0], [np.nan, 1.0]])
    s2 = np.array([[0.0, 5.0], [3.0, 2.0], [0.0, 1.0]])
    assert scorer_votes(s1, s2, "first").tolist() == [[1, -1], [1, 1], [0, 1]]     # 3 >= 3 votes for x¹
    assert scorer_votes(s1, s2, "abstain").tolist() == [[1, -1], [0, 1], [0, 0]]   # an exact tie abstains
    with pytest.raises(ConfigError, match=r"^method\.scorer_ties must be one of first, abstain"):
        scorer_votes(s1, s2, "coin")


def test_majority_vote_and_its_ties():
    votes = np.array([[1, 1, 1, -1], [1, -1, 1, -1], [-1, -1, 1, -1], [0, 0, 1, -1], [0, 0, 0, 1]])
    assert majority_vote(votes).tolist() == [1, 0, -1, 0, 1]


def test_tie_policies():
    vote, own = np.array([1, 0, -1, 0]), [0.0, 1.0, 1.0, 0.5]
    assert resolve_ties(vote, own, "drop") == [1.0, None, 0.0, None]
    assert resolve_ties(vote, own, "dataset_label") == [1.0, 1.0, 0.0, None]   # the dataset's own tie stays out
    assert resolve_ties(vote, own, "first") == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match=r"^method\.tie_policy must be one of drop, dataset_label, first"):
        resolve_ties(vote, own, "coin")


def test_weighted_sum_uses_raw_scales():
    s1, s2 = np.array([[1.0, 100.0]]), np.array([[2.0, 99.5]])
    assert sum_vote(s1, s2, np.array([1.0, 1.0])).tolist() == [-1]     # −1 + 0.5
    assert sum_vote(s1, s2, np.array([1.0, 3.0])).tolist() == [1]      # −1 + 1.5
    assert sum_vote(s1, s1, np.array([1.0, 1.0])).tolist() == [0]      # equal sums tie


def test_normalized_sum_against_hand_computed_z_scores():
    # scorer A on a small scale, scorer B on a large one: raw sums follow B, normalised sums weigh them equally
    s1 = np.array([[0.0, 100.0], [0.1, 120.0], [0.2, 90.0]])
    s2 = np.array([[0.3, 101.0], [0.0, 110.0], [0.1, 95.0]])
    a = [0.0, 0.1, 0.2, 0.3, 0.0, 0.1]
    b = [100.0, 120.0, 90.0, 101.0, 110.0, 95.0]
    mean_a, mean_b = sum(a) / 6, sum(b) / 6
    std_a = math.sqrt(sum((v - mean_a) ** 2 for v in a) / 6)
    std_b = math.sqrt(sum((v - mean_b) ** 2 for v in b) / 6)
    z1, z2 = z_scores(s1, s2)
    assert z1[0].tolist() == pytest.approx([(0.0 - mean_a) / std_a, (100.0 - mean_b) / std_b])
    assert z2[2].tolist() == pytest.approx([(0.1 - mean_a) / std_a, (95.0 - mean_b) / std_b])
    # row 0: raw −0.3 − 1 < 0; normalised (−0.3/std_a) + (−1/std_b) < 0 too. row 2: raw 0.1 − 5 < 0, normalised
    # 0.1/std_a − 5/std_b: std_a = 0.1, std_b = 10.3 → 1.0 − 0.49 > 0 — the small-scale scorer now counts
    margins = [(s1[i, 0] - s2[i, 0]) / std_a + (s1[i, 1] - s2[i, 1]) / std_b for i in range(3)]
    expected = [int(np.sign(m)) for m in margins]
    assert sum_vote(z1, z2, np.ones(2)).tolist() == expected
    assert expected[2] == 1 and sum_vote(s1, s2, np.ones(2)).tolist()[2] == -1


def test_loss_sum_against_hand_computed_values():
    z = torch.tensor([0.5, -1.0])
    votes = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]])
    weights = torch.tensor([1.0, 2.0, 3.0])
    expected = [-logsig(0.5) * 1 - logsig(-0.5) * 2,
                -logsig(-1.0) * 1 - logsig(-1.0) * 2 - logsig(1.0) * 3]
    assert loss_sum(z, votes, weights).tolist() == pytest.approx(expected, rel=1e-6)


def scores_table(s1: np.ndarray, s2: np.ndarray, names, labels) -> pa.Table:
    columns = {"row": list(range(len(labels))), "label_0": labels}
    for k, name in enumerate(names):
        columns[f"{name}_0"], columns[f"{name}_1"] = s1[:, k].tolist(), s2[:, k].tolist()
    return pa.table(columns)


def test_labeller_labels_and_statistics():
    names = ["a", "b", "c", "d"]
    s1 = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0], [5, 5, 5, 5]], dtype=float)
    s2 = np.array([[0, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 1], [5, 5, 5, 5]], dtype=float)
    # votes: [+,+,+,-] → x¹; [+,-,+,-] → tie; [-,-,+,-] → x²; all exact ties → +1 each under "first"
    labeller = EnsembleLabeller("majority_vote", None, None, None, "drop", "first")
    labeller.resolve(names)
    result = labeller.label(scores_table(s1, s2, names, [0.0, 1.0, 0.0, 0.5]))
    assert result.labels == [1.0, None, 0.0, 1.0]
    stats = result.stats
    assert (stats["kept"], stats["ties_dropped"], stats["exact_ties"]) == (3, 1, 4)
    assert stats["flipped_fraction"] == pytest.approx(0.5)     # rows 0 and 2 have dataset labels: row 0 flipped
    assert stats["agreement/a"] == pytest.approx(1.0) and stats["agreement/c"] == pytest.approx(2 / 3)
    abstain = EnsembleLabeller("majority_vote", None, None, None, "drop", "abstain")
    abstain.resolve(names)
    assert abstain.label(scores_table(s1, s2, names, [0.0, 1.0, 0.0, 0.5])).labels == [1.0, None, 0.0, None]
    # the per-step rules keep x¹ first and hand every vote to the loss
    per_step = EnsembleLabeller("loss_sum", None, None, {"b": 2.0}, "drop", "abstain")
    per_step.resolve(names)
    result = per_step.label(scores_table(s1, s2, names, [0.0, 1.0, 0.0, 0.5]))
    assert result.labels == [1.0, 1.0, 1.0, None] and result.extras["votes"][2] == [-1, -1, 1, -1]
    assert per_step.weight_vector().tolist() == [1.0, 2.0, 1.0, 1.0]
    single = EnsembleLabeller("single", None, "c", None, "drop", "first")
    single.resolve(names)
    assert single.label(scores_table(s1, s2, names, [0.0, 1.0, 0.0, 0.5])).labels == [1.0, 1.0, 1.0, 1.0]


def test_labeller_checks_its_scorer_names():
    with pytest.raises(ConfigError, match=r"^method\.ensemble: scorer 'nope' is not configured"):
        EnsembleLabeller("majority_vote", ["a", "nope"], None, None, "drop", "first").resolve(["a", "b"])
    with pytest.raises(ConfigError, match=r"^method\.scorer: label_rule=single needs one scorer of the ensemble"):
        EnsembleLabeller("single", None, "z", None, "drop", "first").resolve(["a", "b"])
    with pytest.raises(ConfigError, match=r"^method\.weights\.z: not a scorer of the ensemble"):
        EnsembleLabeller("weighted_sum", None, None, {"z": 1.0}, "drop", "first").resolve(["a", "b"])
    with pytest.raises(ConfigError, match=r"^scorers: BalancedDPO labels pairs with a scorer ensemble"):
        EnsembleLabeller("majority_vote", None, None, None, "drop", "first").resolve([])


# ------------------------------------------------------------------------------------------------ objective
def test_objective_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^method\.label_rule must be one of majority_vote, single, random"):
        BalancedDPO(label_rule="borda")
    with pytest.raises(ConfigError, match=r"^method\.ref_update_every must be a positive number"):
        BalancedDPO(ref_update_every=0)
    with pytest.raises(ConfigError, match=r"^method\.ref_update_every must be a positive number"):
        BalancedDPO(ref_update_every=-5)
    with pytest.raises(ConfigError, match=r"^method\.ref_update_every: refreshing needs method\.reference"):
        BalancedDPO(ref_update_every=100, reference="base")
    with pytest.raises(ConfigError, match=r"^method\.ref_update_every: refreshing needs method\.reference"):
        BalancedDPO(ref_update_every=100, reference="auto", finetune="lora")
    BalancedDPO(ref_update_every=100, reference="auto", finetune="full")     # auto = frozen_copy: refreshable
    BalancedDPO(ref_update_every=None, reference="base")                     # no refresh: any reference
    with pytest.raises(ConfigError, match=r"^method\.scorer: label_rule=single needs the name of its scorer"):
        BalancedDPO(label_rule="single")
    assert BalancedDPO(label_rule="random").required_extras() == ("votes",)
    assert BalancedDPO().required_extras() == ()


class _Batch:
    def __init__(self, votes, step):
        self.extras = {"votes": votes}
        self.step = step
        self.memo = {}


def test_random_rule_draws_one_scorer_per_step_and_signs_the_dpo_term(monkeypatch):
    import alignment.objectives.balanced_dpo as module

    objective = BalancedDPO(beta=2.0, label_rule="random", ref_update_every=None)
    objective.labeller.resolve(["a", "b", "c"])
    errors = (torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2]))
    monkeypatch.setattr(module, "pair_errors", lambda *args: errors)
    z = (-0.5 * 2.0 * ((errors[0] - errors[1]) - (errors[2] - errors[3]))).tolist()   # [0.2, -0.2]
    votes = [[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]]
    drawn = {objective.random_scorer(0, step) for step in range(40)}
    assert drawn == {0, 1, 2}                                  # every scorer gets drawn
    assert objective.random_scorer(0, 7) == objective.random_scorer(0, 7)
    for step in range(6):
        k = objective.random_scorer(0, step)
        out = objective(None, _Batch(votes, step), seed=0)
        expected = [-logsig(votes[i][k] * z[i]) if votes[i][k] != 0 else 0.0 for i in range(2)]
        assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
        assert out.logs["random_scorer"].item() == k


def test_loss_sum_rule_uses_the_ensemble_weights(monkeypatch):
    import alignment.objectives.balanced_dpo as module

    objective = BalancedDPO(beta=2.0, label_rule="loss_sum", weights={"b": 3.0}, ref_update_every=None)
    objective.labeller.resolve(["a", "b"])
    errors = (torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2]))
    monkeypatch.setattr(module, "pair_errors", lambda *args: errors)
    out = objective(None, _Batch([[1.0, -1.0]], 0), seed=0)
    assert out.loss.item() == pytest.approx(-logsig(0.2) - 3.0 * logsig(-0.2), rel=1e-6)


def test_reference_refresh_at_step_T_and_not_before(tmp_path):
    import lightning as L
    from hydra import compose, initialize_config_dir

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.cli import CONF_DIR
    from alignment.data.component import build_dataset
    from alignment.data.synthetic import make_synthetic_pairs
    from alignment.training.datamodule import AlignmentDataModule
    from alignment.training.module import AlignmentModule

    backbone = build_tiny_backbone()
    objective = BalancedDPO(beta=2000, ref_update_every=3, reference="snapshot")
    module = AlignmentModule(backbone, objective, lora={"rank": 4, "alpha": 4}, optimizer={"lr": 1e-2},
                             reference="snapshot")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.data_dir={tmp_path}"])
    dataset = build_dataset(cfg.dataset, make_synthetic_pairs(tmp_path / "pairs.parquet", num_rows=8))
    x, t = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    cond = backbone.encode_prompt(["a red circle"])
    outputs = {}

    class Probe(L.Callback):
        def record(self, trainer):
            with torch.no_grad():
                with backbone.reference_unet() as unet:
                    reference = backbone.unet_forward(x, t, cond, unet=unet)
                outputs[trainer.global_step] = (reference, backbone.unet_forward(x, t, cond))

        def on_train_batch_start(self, trainer, *args):
            self.record(trainer)

        def on_train_end(self, trainer, *args):
            self.record(trainer)

    with torch.no_grad():
        base = backbone.unet_forward(x, t, cond)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Probe()])
    trainer.fit(module, datamodule=AlignmentDataModule(dataset, batch_size=2))
    for step in (0, 1, 2):                                         # before T = 3: the base model
        assert torch.equal(outputs[step][0], base)
    assert not torch.equal(outputs[2][1], base)                    # although the policy has moved
    assert torch.equal(outputs[3][0], outputs[3][1])               # at T: the reference is the policy
    assert torch.equal(outputs[5][0], outputs[3][1]) and not torch.equal(outputs[5][0], outputs[5][1])
    assert torch.equal(outputs[6][0], outputs[6][1])               # and again at 2T
    assert int(backbone.reference.refreshes) == 2


# ------------------------------------------------------------------------------------------------ cached scores
class MeanColourScorer(Scorer):
    """A scorer with weights: w · mean RGB (a change of w is a change of weights, so of the cache key)."""

    def __init__(self, weights=(1.0, 0.0, 0.0)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(weights))
        self._calls = 0

    def forward(self, images, prompts):
        self._calls += 1
        return images.float().mean(dim=(2, 3)) @ self.w


def png(colour, size=16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def colour_pairs(tmp_path) -> Path:
    rows = [{"caption": f"pair {i}", "jpg_0": png((40 * i, 200 - 30 * i, 100), 16 if i % 2 else 24),
             "jpg_1": png((100, 40 * i, 250 - 20 * i), 16 if i % 2 else 24), "label_0": float(i % 2)}
            for i in range(5)]
    rows.append({"caption": "broken", "jpg_0": b"not an image", "jpg_1": png((1, 2, 3)), "label_0": 1.0})
    path = tmp_path / "pairs" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_pair_scores_are_every_scorers_raw_scores_cached_beside_the_data(colour_pairs):
    from alignment.builders.pair_scores import PairScores, default_out
    from alignment.builders.runner import ensure_built

    red, blue = MeanColourScorer((1.0, 0.0, 0.0)), MeanColourScorer((0.0, 0.0, 1.0))
    builder = PairScores(str(colour_pairs), ["red", "blue"], batch_size=2)
    assert default_out(str(colour_pairs)) == colour_pairs.parent
    path = ensure_built(builder, default_out(str(colour_pairs)), None, {"red": red, "blue": blue}, progress=False)
    assert path.parent == colour_pairs.parent and path.name.startswith("pair_scores-")
    table = pq.read_table(path).to_pylist()
    assert [r["row"] for r in table] == list(range(6)) and table[1]["label_0"] == 1.0
    for i in range(5):   # mean of a flat colour, exactly what the scorer sees
        assert table[i]["red_0"] == pytest.approx(40 * i / 255, abs=1e-6)
        assert table[i]["blue_1"] == pytest.approx((250 - 20 * i) / 255, abs=1e-6)
    assert math.isnan(table[5]["red_0"]) and table[5]["red_1"] == pytest.approx(1 / 255, abs=1e-6)
    calls = red._calls
    assert calls > 0
    # a second run scores nothing
    again = ensure_built(PairScores(str(colour_pairs), ["red", "blue"], batch_size=2), colour_pairs.parent, None,
                         {"red": red, "blue": blue}, progress=False)
    assert again == path and red._calls == calls
    # other scorer weights: another key, scored afresh — the old cache is never reused for them
    with torch.no_grad():
        red.w.mul_(2.0)
    other = ensure_built(PairScores(str(colour_pairs), ["red", "blue"], batch_size=2), colour_pairs.parent, None,
                         {"red": red, "blue": blue}, progress=False)
    assert other != path and red._calls > calls
    assert pq.read_table(other).column("red_0")[2].as_py() == pytest.approx(2 * 80 / 255, abs=1e-6)


def test_pair_scores_bad_input(colour_pairs, tmp_path):
    from alignment.builders.pair_scores import PairScores

    with pytest.raises(ConfigError, match=r"^builder\.scorers: name at least one scorer"):
        PairScores(str(colour_pairs), [])
    bad = tmp_path / "no_label.parquet"
    pq.write_table(pq.read_table(colour_pairs).drop(["label_0"]), bad)
    with pytest.raises(ConfigError, match=r"^builder\.source: .* has no column 'label_0'"):
        PairScores(str(bad), ["red"])


def test_an_unscorable_row_is_a_bad_row_not_a_tie(colour_pairs):
    from alignment.builders.runner import build_table
    from alignment.builders.pair_scores import PairScores
    from alignment.data.pickapic import PreferencePairs
    from alignment.errors import DataError

    scorers = {"red": MeanColourScorer((1.0, 0.0, 0.0)), "blue": MeanColourScorer((0.0, 0.0, 1.0))}
    table = build_table(PairScores(str(colour_pairs), ["red", "blue"]), None, scorers)
    for tie_policy in ("first", "drop"):
        labeller = EnsembleLabeller("majority_vote", None, None, None, tie_policy, "first")
        labeller.resolve(["red", "blue"])
        result = labeller.label(table)
        assert math.isnan(result.labels[5]) and result.stats["unscorable"] == 1      # row 5: jpg_0 is not an image
        with pytest.raises(DataError, match=r"row 5: the method could not label it"):
            PreferencePairs(colour_pairs, resolution=16, labels=result.labels, check_images=False, bad_rows="fail")
        dataset = PreferencePairs(colour_pairs, resolution=16, labels=result.labels, check_images=False,
                                  bad_rows="skip")
        assert dataset.skipped_rows == [5] and 5 not in dataset.rows()


def test_a_read_only_score_folder_is_one_line_before_any_model(tmp_path, toy_world_pairs, monkeypatch):
    import os

    from tests.test_bad_inputs import train_error

    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else True)
    error = train_error(tmp_path, "experiment=toy_balanced_dpo", f"dataset.source={toy_world_pairs}")
    assert error.startswith("method.label_cache: cannot write the pair scores into"), error


def test_the_source_is_read_before_any_model(tmp_path, toy_world_pairs, monkeypatch):
    import alignment.config
    from tests.test_bad_inputs import train_error

    built = []
    original = alignment.config.instantiate_checked
    monkeypatch.setattr(alignment.config, "instantiate_checked",
                        lambda node, key, **kw: built.append(key) or original(node, key, **kw))
    error = train_error(tmp_path, "experiment=toy_balanced_dpo", f"dataset.source={toy_world_pairs}",
                        "dataset.ties=coin")
    assert error == "dataset.ties must be one of drop, keep_first, got 'coin'"
    error = train_error(tmp_path, "experiment=toy_balanced_dpo", f"dataset.source={toy_world_pairs}",
                        "dataset.extra_columns=[nope]")
    assert error.startswith("dataset.extra_columns: ") and "has no column 'nope'" in error
    assert "backbone" not in built


# ------------------------------------------------------------------------------------------------ bad input (CLI)
@pytest.mark.parametrize("overrides, expected", [
    (("scorers=[toy_colour,aesthetic]",), "scorers.aesthetic.mlp_weights: required — the weights of scorer "
                                          "'aesthetic'"),
    (("scorers=[toy_colour,aesthetic]", "scorers.aesthetic.mlp_weights=/nowhere/head.pth"),
     "scorers.aesthetic.mlp_weights: /nowhere/head.pth does not exist"),
    (("scorers=toy_quality", "method.ref_update_every=0"), "method.ref_update_every must be a positive number"),
    (("scorers=toy_quality", "method.label_rule=borda"), "method.label_rule must be one of majority_vote, single"),
    (("scorers=toy_quality", "method.reference=base"), "method.ref_update_every: refreshing needs"),
    (("scorers=toy_quality", "method.ensemble=[toy_colour,toy_colr]"), "method.ensemble: scorer 'toy_colr' is not"),
    (("scorers=toy_quality", "method.label_rule=single"), "method.scorer: label_rule=single needs the name"),
    (("scorers=none",), "scorers: BalancedDPO labels pairs with a scorer ensemble and none is configured"),
    (("scorers=toy_quality", "method.label_rule=loss_sum", "terms=[sft]"), "method.objective: term"),
])
def test_bad_input_is_one_line_before_any_model(tmp_path, monkeypatch, data_dir, overrides, expected):
    import alignment.config
    from tests.test_bad_inputs import train_error

    built = []
    original = alignment.config.instantiate_checked
    monkeypatch.setattr(alignment.config, "instantiate_checked",
                        lambda node, key, **kw: built.append(key) or original(node, key, **kw))
    error = train_error(tmp_path, "method=balanced_dpo", *overrides)
    assert error.startswith(expected), error
    assert "backbone" not in built and not any(key.startswith("scorers") for key in built)


# ------------------------------------------------------------------------------------------------ CLI runs
@pytest.fixture(scope="module")
def toy_world_pairs(tmp_path_factory) -> Path:
    """Pairs of rendered toy-world images (with the world's flaws) in the Pick-a-Pic schema: real toy captions, so
    the toy quality scorers can score them; the dataset's own labels are arbitrary."""
    from alignment.toy import world as W
    from alignment.toy.pairs import captions_for, encode_png

    rows = []
    for i, caption in enumerate(captions_for("train")[:12]):
        first = W.render_caption(caption, seed=2 * i, world=W.DEFAULT_WORLD).image
        second = W.render_caption(caption, seed=2 * i + 1, world=W.DEFAULT_WORLD).image
        rows.append({"caption": caption, "jpg_0": encode_png(first), "jpg_1": encode_png(second),
                     "label_0": float(i % 2)})
    path = tmp_path_factory.mktemp("toy_world_pairs") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def train_toy(run_dir: Path, source: Path, *overrides: str):
    proc = run_cli("alignment.run", "experiment=toy_balanced_dpo", *FAST_RUN, "trainer.max_steps=2",
                   "dataset.batch_size=4", f"dataset.source={source}", f"hydra.run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_toy_run_labels_once_and_logs_the_label_statistics(tmp_path, toy_world_pairs):
    first = train_toy(tmp_path / "a", toy_world_pairs, "method.ref_update_every=1")
    stats = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert stats["rule"] == "majority_vote" and stats["pairs"] == 12
    assert stats["kept"] + stats["ties_dropped"] == 12 and stats["dataset_rows"] == stats["kept"]
    assert set(stats["scorers"]) == {"toy_colour", "toy_shape", "toy_centring", "toy_contrast"}
    assert 0.0 <= stats["flipped_fraction"] <= 1.0 and "agreement/toy_contrast" in stats
    scores = list(toy_world_pairs.parent.glob("pair_scores-*.parquet"))
    assert len(scores) == 1 and stats["scores"] == str(scores[0])      # cached beside the data
    assert "labels (majority_vote):" in first.stderr and "pair_scores" in first.stderr
    mtime = scores[0].stat().st_mtime_ns
    # the ablations read the same cache; a second run scores nothing
    second = train_toy(tmp_path / "b", toy_world_pairs, "method.label_rule=loss_sum")
    assert scores[0].stat().st_mtime_ns == mtime and "merged" not in second.stderr
    assert list(toy_world_pairs.parent.glob("pair_scores-*.parquet")) == scores
    stats_b = json.loads((tmp_path / "b" / "labels.json").read_text())
    assert stats_b["rule"] == "loss_sum" and stats_b["exact_ties"] == stats["exact_ties"]
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    train_toy(tmp_path / "c", toy_world_pairs, "method.label_rule=random", "method.scorer_ties=abstain")
    assert json.loads((tmp_path / "c" / "labels.json").read_text())["rule"] == "random"


@pytest.mark.slow
def test_prompt_only_path_samples_votes_and_trains(tmp_path):
    from alignment.toy.pairs import captions_for

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(captions_for("train")[:3]) + "\n")
    run_dir = tmp_path / "run"
    proc = run_cli("alignment.run", "experiment=balanced_dpo_prompts", "backbone=toy", "scorers=toy_quality",
                   *FAST_RUN, f"dataset.generate.prompts={prompts}", "dataset.generate.num_images=4",
                   "dataset.generate.num_inference_steps=2", "dataset.batch_size=2", "trainer.max_steps=2",
                   "method.ref_update_every=1", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pools = list((tmp_path / "data" / "pools").glob("pools-*.parquet"))
    scores = list((tmp_path / "data" / "pools").glob("pair_scores-*.parquet"))
    assert len(pools) == 1 and len(scores) == 1                     # the scores sit beside the sampled pairs
    table = pq.read_table(pools[0])
    assert table.num_rows == 6 and set(table.column("label_0").to_pylist()) == {0.5}   # unlabelled until the vote
    stats = json.loads((run_dir / "labels.json").read_text())
    assert stats["pairs"] == 6 and stats["kept"] == stats["dataset_rows"] >= 1
    assert stats["flipped_fraction"] is None                         # no dataset labels to flip (NaN -> null)


@pytest.mark.parametrize("experiment", ["balanced_dpo_sd15", "balanced_dpo_sd21", "balanced_dpo_sdxl",
                                        "balanced_dpo_prompts", "toy_balanced_dpo"])
def test_experiment_files_compose_and_pass_the_checks_that_build_nothing(experiment, tmp_path):
    from hydra import compose, initialize_config_dir

    from alignment.cli import CONF_DIR
    from alignment.data.component import check_objective_fits
    from alignment.objectives.compose import build_objective
    from alignment.training.reference import check_reference
    from alignment.training.schema import check_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", f"output_dir={tmp_path}"])
    check_run_config(cfg)
    objective = build_objective(cfg.method, cfg.get("terms"))
    assert isinstance(objective, BalancedDPO) and objective.ref_update_every == 100
    check_reference(cfg.method.reference, cfg.method.finetune)
    check_objective_fits(objective, cfg.dataset)
    names = objective.pair_labeller().resolve([str(n) for n in cfg.scorers])
    if experiment.startswith("balanced_dpo_sd"):   # the paper: 2000 steps, effective batch 128, lr 1e-8 × batch
        assert names == ["pickscore", "hpsv2", "clip", "aesthetic"]
        assert cfg.trainer.max_steps == 2000 and cfg.method.lr_scheduler.warmup_steps == 500
        assert cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices == 128
        assert cfg.method.optimizer.lr == 1e-8 and cfg.method.optimizer.scale_lr
        assert cfg.method.reference == "frozen_copy" and cfg.method.finetune == "full"
