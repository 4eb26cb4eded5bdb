"""BalancedDPO: Diffusion-DPO on pairs relabelled by a majority vote of several scorers, with a reference that is
periodically replaced by the policy (docs/methods.md#balanceddpo).

Reads top to bottom:

1. the labelling rules as pure functions of the cached raw scores (``scorer_votes``, ``majority_vote``,
   ``sum_vote``, ``z_scores``, ``resolve_ties``) — docs/methods.md#labels-by-majority-vote;
2. ``EnsembleLabeller``: the objective's pair labeller (docs/contract.md#pair-labellers): the scores come once from
   the ``PairScores`` builder, cached beside the data; the labels (and, for the rules that decide per step, every
   scorer's vote as the per-sample extra ``votes``) are computed from them when a run starts, with statistics;
3. ``BalancedDPO``: the loss — plain Diffusion-DPO on the relabelled pair, or for ``random`` / ``loss_sum`` the
   per-scorer form on the pair in its dataset order — and the reference refresh every ``ref_update_every``
   optimizer steps.

Label rules (``method.label_rule``, the paper's Tables 3–4):

=================  ==================================================================================
majority_vote      s = sign(Σ_k s_k), s_k = +1 if r_k(x¹) ≥ r_k(x²) else −1              [Eq 6–7]
single             s = s_k of one scorer (``method.scorer``)
random             s = s_k of one scorer drawn at random at each optimizer step
weighted_sum       s = sign(Σ_k w_k (r_k(x¹) − r_k(x²))), raw scales
normalized_sum     as weighted_sum, each r_k z-scored over the dataset's images first
loss_sum           loss = −Σ_k w_k log σ(s_k z), z the DPO inside term with (w, l) = (x¹, x²)     [Eq 10]
=================  ==================================================================================
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alignment.errors import ConfigError
from alignment.objectives.base import ObjectiveOutput, PairBatch
from alignment.objectives.dpo import DiffusionDPO, dpo_loss, pair_errors
from alignment.seeding import derive_seed

LABEL_RULES = ("majority_vote", "single", "random", "weighted_sum", "normalized_sum", "loss_sum")
PER_STEP_RULES = ("random", "loss_sum")   # decided in the loss; the dataset keeps the pair's own order
TIE_POLICIES = ("drop", "dataset_label", "first")
SCORER_TIES = ("first", "abstain")
REFERENCES_THAT_REFRESH = ("snapshot", "frozen_copy")


# ------------------------------------------------------------------------------------------------ label rules
def scorer_votes(scores_1: np.ndarray, scores_2: np.ndarray, scorer_ties: str = "first") -> np.ndarray:
    """Per-scorer votes s_k [Eq 6]: (P, K) int8, +1 when scorer k prefers x¹, −1 when it prefers x².

    An exact tie r_k(x¹) = r_k(x²) is +1 under the paper's ``≥`` rule (``scorer_ties="first"``) or 0 — the scorer
    abstains — under ``"abstain"``. A missing score (NaN: an unreadable image) always abstains."""
    if scorer_ties not in SCORER_TIES:
        raise ConfigError(f"method.scorer_ties must be one of {', '.join(SCORER_TIES)}, got {scorer_ties!r}")
    s1, s2 = np.asarray(scores_1, dtype=float), np.asarray(scores_2, dtype=float)
    votes = np.where(s1 > s2, 1, np.where(s1 < s2, -1, 1 if scorer_ties == "first" else 0))
    votes[np.isnan(s1) | np.isnan(s2)] = 0
    return votes.astype(np.int8)


def majority_vote(votes: np.ndarray) -> np.ndarray:
    """s = sign(Σ_k s_k) [Eq 7]: (P,) in {+1, −1, 0}; 0 is a tie (even K, or abstentions)."""
    return np.sign(np.asarray(votes, dtype=np.int64).sum(axis=1)).astype(np.int8)


def sum_vote(scores_1: np.ndarray, scores_2: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """s = sign(Σ_k w_k (r_k(x¹) − r_k(x²))): (P,) in {+1, −1, 0}; an exactly equal sum (or a NaN) is a tie."""
    margin = (np.asarray(scores_1, dtype=float) - np.asarray(scores_2, dtype=float)) @ np.asarray(weights, float)
    return np.where(np.isnan(margin), 0, np.sign(margin)).astype(np.int8)


def z_scores(scores_1: np.ndarray, scores_2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each scorer's scores standardised over all the dataset's images (both columns): (r − mean_k) / std_k. A
    scorer with zero spread stays 0 (it cannot prefer anything)."""
    s1, s2 = np.asarray(scores_1, dtype=float), np.asarray(scores_2, dtype=float)
    both = np.concatenate([s1, s2])
    mean, std = np.nanmean(both, axis=0), np.nanstd(both, axis=0)
    std = np.where(std > 0, std, np.inf)
    return (s1 - mean) / std, (s2 - mean) / std


def resolve_ties(vote: np.ndarray, dataset_labels: Sequence[float], tie_policy: str) -> list[float | None]:
    """The pair label per row: 1.0 (x¹ preferred), 0.0 (x² preferred) or ``None`` (the row is not trained on).

    A tie (vote 0) follows ``tie_policy``: ``drop`` removes the row; ``dataset_label`` uses the dataset's own label
    when that is not itself a tie; ``first`` prefers x¹."""
    if tie_policy not in TIE_POLICIES:
        raise ConfigError(f"method.tie_policy must be one of {', '.join(TIE_POLICIES)}, got {tie_policy!r}")
    labels: list[float | None] = []
    for s, own in zip(np.asarray(vote).tolist(), dataset_labels):
        if s > 0:
            labels.append(1.0)
        elif s < 0:
            labels.append(0.0)
        elif tie_policy == "first":
            labels.append(1.0)
        elif tie_policy == "dataset_label" and own in (0.0, 1.0):
            labels.append(float(own))
        else:
            labels.append(None)
    return labels


def loss_sum(z: torch.Tensor, votes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample −Σ_k w_k log σ(s_k z) [Eq 10], ``z`` the DPO inside term with (w, l) = (x¹, x²); an abstaining
    scorer (s_k = 0) adds nothing."""
    votes = votes.to(z.dtype)
    terms = -F.logsigmoid(votes * z[:, None]) * (votes != 0)
    return (terms * weights.to(z.dtype)).sum(dim=1)


# ------------------------------------------------------------------------------------------------ labeller
@dataclass
class PairLabels:
    """What a pair labeller gives the dataset: per source row a label (1.0, 0.0 or ``None`` = left out), extra
    per-sample columns for the objective, and statistics for the log."""

    labels: list[float | None]           # NaN: a bad row (unscorable), handled by dataset.bad_rows
    extras: dict[str, list] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class EnsembleLabeller:
    """Labels pairs from every scorer's cached raw scores (``PairScores``) by ``label_rule``."""

    def __init__(self, label_rule: str, ensemble: Sequence[str] | None, scorer: str | None,
                 weights: Mapping[str, float] | None, tie_policy: str, scorer_ties: str):
        self.label_rule, self.ensemble, self.scorer = label_rule, ensemble, scorer
        self.weights, self.tie_policy, self.scorer_ties = dict(weights or {}), tie_policy, scorer_ties
        self.names: list[str] | None = None
        self.label_cache: str | None = None
        self.extras = ("votes",) if label_rule in PER_STEP_RULES else ()
        # the per-step rules keep each pair in its dataset order: latents_w is x¹, not necessarily the preferred one
        self.orders_pairs = label_rule not in PER_STEP_RULES

    # -- before any model: which scorers
    def resolve(self, available: Sequence[str]) -> list[str]:
        """The ensemble's scorer names (``method.ensemble``, or every configured scorer), checked."""
        names = [str(n) for n in (self.ensemble if self.ensemble is not None else available)]
        if not names:
            raise ConfigError("scorers: BalancedDPO labels pairs with a scorer ensemble and none is configured "
                              "(e.g. scorers=balanced, or scorers=toy_quality in the toy world)")
        for name in names:
            if name not in available:
                raise ConfigError(f"method.ensemble: scorer {name!r} is not configured (scorers: "
                                  f"{', '.join(available) or 'none'})")
        if self.label_rule == "single" and self.scorer not in names:
            raise ConfigError(f"method.scorer: label_rule=single needs one scorer of the ensemble "
                              f"({', '.join(names)}), got {self.scorer!r}")
        unknown = sorted(set(self.weights) - set(names))
        if unknown:
            raise ConfigError(f"method.weights.{unknown[0]}: not a scorer of the ensemble ({', '.join(names)})")
        self.names = names
        return names

    def weight_vector(self) -> np.ndarray:
        return np.asarray([float(self.weights.get(name, 1.0)) for name in self._names()], dtype=float)

    def _names(self) -> list[str]:
        if self.names is None:
            raise RuntimeError("EnsembleLabeller.resolve(available scorers) must run first")
        return self.names

    def builder(self, source: str, split: str = "train", max_rows: int | None = None,
                hf_cache_dir: str | None = None):
        from alignment.builders.pair_scores import PairScores

        return PairScores(source, self._names(), split=split, max_rows=max_rows, hf_cache_dir=hf_cache_dir,
                          config_key="dataset")

    def cache_dir(self, source: str) -> Path:
        """Where the scores are cached: ``method.label_cache``, else beside the data."""
        from alignment.builders.pair_scores import default_out

        return Path(self.label_cache).expanduser() if self.label_cache else default_out(source)

    @staticmethod
    def describe(stats: dict[str, Any]) -> str:
        """One line for the log."""
        agreement = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in stats.items() if k.startswith("agreement/"))
        return (f"labels ({stats['rule']}): {stats['kept']} of {stats['pairs']} pairs kept, {stats['ties_dropped']} "
                f"dropped as ties, {stats['unscorable']} unscorable; flipped against the dataset's labels: "
                f"{stats['flipped_fraction']:.3f}; agreement with the {stats['compared_with']}: {agreement}; exact "
                f"score ties: {stats['exact_ties']}")

    # -- after scoring: labels
    def label(self, table) -> PairLabels:
        """Labels, extras and statistics from a ``PairScores`` table (one row per source row, in order)."""
        from alignment.builders.pair_scores import score_columns

        names = self._names()
        s1 = np.stack([np.asarray(table.column(score_columns(n)[0]).to_pylist(), float) for n in names], axis=1)
        s2 = np.stack([np.asarray(table.column(score_columns(n)[1]).to_pylist(), float) for n in names], axis=1)
        own = [None if v is None or math.isnan(v) else float(v) for v in table.column("label_0").to_pylist()]
        # a row some image of which could not be scored, or whose own label is not 0 / 0.5 / 1, is a bad row for
        # the dataset (dataset.bad_rows), not a tie
        unscorable = np.isnan(s1).any(axis=1) | np.isnan(s2).any(axis=1) | ~np.isin(
            np.asarray([o if o is not None else np.nan for o in own], float), (0.0, 0.5, 1.0))
        votes = scorer_votes(s1, s2, self.scorer_ties)
        rule = self.label_rule
        if rule == "majority_vote":
            vote = majority_vote(votes)
        elif rule == "single":
            vote = votes[:, names.index(self.scorer)]
        elif rule == "weighted_sum":
            vote = sum_vote(s1, s2, self.weight_vector())
        elif rule == "normalized_sum":
            vote = sum_vote(*z_scores(s1, s2), self.weight_vector())
        else:  # random / loss_sum: decided per step in the loss; keep x¹ first, drop rows no scorer decides
            vote = np.where((votes != 0).any(axis=1), 1, 0).astype(np.int8)
        policy = self.tie_policy if rule not in PER_STEP_RULES else "drop"
        labels = resolve_ties(vote, own, policy)
        labels = [math.nan if bad else label for bad, label in zip(unscorable.tolist(), labels)]
        extras = {"votes": votes.astype(float).tolist()} if rule in PER_STEP_RULES else {}
        # the per-step rules have no fixed label: their statistics describe the majority vote of the same scores
        shown = labels if rule not in PER_STEP_RULES else [
            math.nan if bad else label for bad, label in zip(unscorable.tolist(), resolve_ties(
                majority_vote(votes), own, "drop"))]
        stats = self.statistics(votes, vote if rule not in PER_STEP_RULES else majority_vote(votes), shown, own,
                                s1, s2)
        stats.update({"rule": rule, "kept": int(sum(lab is not None and not math.isnan(lab) for lab in labels)),
                      "unscorable": int(unscorable.sum()),
                      "compared_with": "label" if rule not in PER_STEP_RULES else "majority vote"})
        stats["ties_dropped"] = stats["pairs"] - stats["kept"] - stats["unscorable"]
        return PairLabels(labels, extras, stats)

    def statistics(self, votes, vote, labels, own, s1, s2) -> dict[str, Any]:
        """What the run logs about its labels: flips against the dataset's own labels, each scorer's agreement
        with the label, ties dropped, and how many single-scorer votes were exact score ties."""
        names = self._names()
        labels = [None if lab is not None and math.isnan(lab) else lab for lab in labels]
        kept = np.asarray([lab is not None for lab in labels])
        new = np.asarray([lab if lab is not None else np.nan for lab in labels], dtype=float)
        own_arr = np.asarray([o if o is not None else np.nan for o in own], dtype=float)
        both = kept & np.isin(own_arr, (0.0, 1.0))
        stats: dict[str, Any] = {
            "rule": self.label_rule, "scorers": names, "pairs": int(len(labels)), "kept": int(kept.sum()),
            "ties_dropped": int((~kept).sum()),
            "ties": int((np.asarray(vote) == 0).sum()),
            "flipped_fraction": float((new[both] != own_arr[both]).mean()) if both.any() else float("nan"),
            "first_preferred_fraction": float((new[kept] == 1.0).mean()) if kept.any() else float("nan"),
        }
        decided = np.asarray(vote) != 0
        label_sign = np.where(new == 1.0, 1, np.where(new == 0.0, -1, 0))
        for k, name in enumerate(names):
            voting = decided & (votes[:, k] != 0) & kept
            stats[f"agreement/{name}"] = float((votes[voting, k] == label_sign[voting]).mean()) \
                if voting.any() else float("nan")
            stats[f"exact_ties/{name}"] = int((s1[:, k] == s2[:, k]).sum())
        stats["exact_ties"] = int(sum(stats[f"exact_ties/{n}"] for n in names))
        return stats


# ------------------------------------------------------------------------------------------------ objective
class BalancedDPO(DiffusionDPO):
    """Diffusion-DPO on ensemble-relabelled pairs (``method=balanced_dpo``), docs/methods.md#balanceddpo.

    Args:
        beta, share_noise: as Diffusion-DPO.
        label_rule: one of ``LABEL_RULES`` (the module docstring).
        ensemble: scorer names of the ``scorers`` config; ``None``: every configured scorer.
        scorer: the one scorer of ``label_rule=single``.
        weights: ``{scorer: w_k}`` for the sums and the loss sum (default 1 each).
        tie_policy: ``drop | dataset_label | first`` — a vote with Σ s_k = 0.
        scorer_ties: ``first`` (the paper's ≥: an exact score tie votes for x¹) | ``abstain``.
        ref_update_every: refresh the reference from the policy every this many optimizer steps; ``None``: never.
        reference, finetune: ``method.reference`` / ``method.finetune``, to check that the reference can refresh.
        label_cache: folder of the cached scores; ``None``: beside the data (``pair_scores.default_out``).
    """

    def __init__(self, beta: float = 5000.0, share_noise: bool = True, label_rule: str = "majority_vote",
                 ensemble: list[str] | None = None, scorer: str | None = None,
                 weights: dict[str, float] | None = None, tie_policy: str = "drop", scorer_ties: str = "first",
                 ref_update_every: int | None = 100, reference: str = "snapshot", finetune: str = "lora",
                 label_cache: str | None = None):
        super().__init__(beta=beta, share_noise=share_noise)
        if label_rule not in LABEL_RULES:
            raise ConfigError(f"method.label_rule must be one of {', '.join(LABEL_RULES)}, got {label_rule!r}")
        if tie_policy not in TIE_POLICIES:
            raise ConfigError(f"method.tie_policy must be one of {', '.join(TIE_POLICIES)}, got {tie_policy!r}")
        if scorer_ties not in SCORER_TIES:
            raise ConfigError(f"method.scorer_ties must be one of {', '.join(SCORER_TIES)}, got {scorer_ties!r}")
        if label_rule == "single" and not scorer:
            raise ConfigError("method.scorer: label_rule=single needs the name of its scorer")
        for name, weight in (weights or {}).items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"method.weights.{name} must be a finite number, got {weight!r}")
        if ref_update_every is not None:
            if isinstance(ref_update_every, bool) or not isinstance(ref_update_every, int) or ref_update_every <= 0:
                raise ConfigError(f"method.ref_update_every must be a positive number of optimizer steps or null "
                                  f"(no refresh), got {ref_update_every!r}")
            effective = reference if reference != "auto" else ("frozen_copy" if finetune == "full" else "base")
            if effective not in REFERENCES_THAT_REFRESH:
                raise ConfigError(f"method.ref_update_every: refreshing needs method.reference=snapshot (LoRA) or "
                                  f"frozen_copy (full), got method.reference={reference}")
        self.label_rule, self.ref_update_every = label_rule, ref_update_every
        self.labeller = EnsembleLabeller(label_rule, ensemble, scorer, weights, tie_policy, scorer_ties)
        self.labeller.label_cache = label_cache

    def pair_labeller(self) -> EnsembleLabeller:
        return self.labeller

    def required_extras(self) -> tuple[str, ...]:
        return super().required_extras() + self.labeller.extras

    def random_scorer(self, seed: int, step: int) -> int:
        """The scorer whose vote labels every pair of optimizer step ``step`` (``label_rule=random``)."""
        return random.Random(derive_seed(seed, step, "balanced_dpo.random_scorer")).randrange(len(self.labeller.names))

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        if self.label_rule not in PER_STEP_RULES:  # the pair is already (winner, loser) by the rule
            return super().forward(backbone, batch, seed)
        # the pair is (x¹, x²); swapping w and l negates z (shared noise), so a vote s_k is a sign on z
        policy_1, policy_2, ref_1, ref_2 = pair_errors(backbone, batch, seed, self.share_noise)
        _, z = dpo_loss(policy_1, policy_2, ref_1, ref_2, self.beta)
        votes = torch.as_tensor(batch.extras["votes"], device=z.device, dtype=z.dtype).reshape(len(z), -1)
        if self.label_rule == "random":
            k = self.random_scorer(seed, batch.step)
            votes, weights = votes[:, k:k + 1], torch.ones(1)
        else:
            weights = torch.as_tensor(self.labeller.weight_vector())
        losses = loss_sum(z, votes, weights.to(z.device))
        signed = votes * z[:, None]
        voting = votes != 0
        logs = {
            "implicit_acc": ((signed > 0) & voting).sum() / voting.sum().clamp(min=1),
            "reward_margin": (signed * voting).sum() / voting.sum().clamp(min=1),
            "policy_err_w": policy_1.mean(), "policy_err_l": policy_2.mean(),
            "ref_err_w": ref_1.mean(), "ref_err_l": ref_2.mean(),
        }
        if self.label_rule == "random":
            logs["random_scorer"] = torch.tensor(float(k))
        return ObjectiveOutput(losses.mean(), {name: v.detach() for name, v in logs.items()})

    def on_optimizer_step_end(self, backbone, step: int) -> None:
        # Alg. 1 line 14: every ref_update_every optimizer steps the reference becomes the current policy
        if self.ref_update_every and step % self.ref_update_every == 0:
            backbone.reference.refresh()
