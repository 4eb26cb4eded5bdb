"""Objectives compose: a method can be a weighted sum of loss components over one batch
(docs/contract.md#composed-objectives).

    loss = Σ_k w_k · loss_k

The terms run in order on the same batch object, so a denoising pass one term made (e.g. DPO's policy pass over
w‖l) is reused by the next term that needs the same pass (``shared_pass``): SFT regularisation beside DPO costs no
UNet call. The first term's logs keep their names (``train/implicit_acc``); the others are prefixed with their
name (``train/sft/loss``, ``train/sft/policy_err_w``).

Two ways to build one:

- in a method file, ``objective: {_target_: alignment.objectives.compose.WeightedSum, terms: {...}, weights: {...}}``;
- from the command line, beside any method: ``terms=[sft] terms.sft.weight=0.1`` (``conf/terms/``), which
  ``build_objective`` appends to ``method.objective``.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from alignment.errors import ConfigError
from alignment.objectives.base import Objective, ObjectiveOutput


class WeightedSum(Objective):
    """``Σ_k weights[k] · terms[k](batch)``; every term sees the same batch (and its shared passes)."""

    def __init__(self, terms: dict[str, Objective], weights: dict[str, float] | None = None):
        super().__init__()
        if not terms:
            raise ConfigError("method.objective.terms: a weighted sum needs at least one term")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise ConfigError(f"method.objective.weights.{unknown[0]}: no term of that name "
                              f"(terms: {', '.join(terms)})")
        self.terms = torch.nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, term in terms.items():
            if not isinstance(term, Objective):
                raise ConfigError(f"method.objective.terms.{name}: {type(term).__name__} is not an Objective")
            weight = weights.get(name, 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"method.objective.weights.{name} must be a finite number, got {weight!r}")
            self.terms[name] = term
            self.weights[name] = float(weight)
        kinds = {name: term.batch_kind for name, term in self.terms.items()}
        if len(set(kinds.values())) > 1:
            described = ", ".join(f"{name} needs {kind}" for name, kind in kinds.items())
            raise ConfigError(f"method.objective: the terms need different data ({described})")
        self.batch_kind = next(iter(kinds.values()))
        self.needs_reference = any(term.needs_reference for term in self.terms.values())
        owners = [name for name, term in self.terms.items() if term.conditioner is not None]
        if len(owners) > 1:
            raise ConfigError(f"method.objective: terms {owners[0]} and {owners[1]} both bring a conditioner; "
                              "at most one term may own the conditioning")

    # the conditioner lives in the term that owns it (one module, one set of checkpoint keys)
    @property
    def conditioner(self):
        for term in self.__dict__.get("_modules", {}).get("terms", {}).values():
            if term.conditioner is not None:
                return term.conditioner
        return None

    @conditioner.setter
    def conditioner(self, value) -> None:
        if value is not None:
            raise ConfigError("a weighted sum takes its conditioner from its terms")

    def required_extras(self) -> tuple[str, ...]:
        names: list[str] = []
        for term in self.terms.values():
            names += [n for n in term.required_extras() if n not in names]
        return tuple(names)

    def wanted_scorers(self, available: list[str]) -> list[str]:
        names: list[str] = []
        for term in self.terms.values():
            names += [n for n in term.wanted_scorers(available) if n not in names]
        return names

    def setup(self, backbone, scorers: dict | None = None) -> None:
        scorers = scorers or {}
        available = list(scorers)
        for term in self.terms.values():
            term.setup(backbone, {n: scorers[n] for n in term.wanted_scorers(available) if n in scorers})

    def frozen_modules(self) -> dict:
        modules = {}
        for name, term in self.terms.items():
            modules.update({f"{name}.{key}": module for key, module in term.frozen_modules().items()})
        return modules

    def forward(self, backbone, batch, seed: int) -> ObjectiveOutput:
        total, logs = None, {}
        for position, (name, term) in enumerate(self.terms.items()):
            out = term(backbone, batch, seed)
            weighted = self.weights[name] * out.loss
            total = weighted if total is None else total + weighted
            prefix = "" if position == 0 else f"{name}/"
            if position:
                logs[f"{name}/loss"] = out.loss.detach()
            logs.update({prefix + key: value for key, value in out.logs.items()})
        return ObjectiveOutput(total, logs)

    def on_optimizer_step_end(self, backbone, step: int) -> None:
        for term in self.terms.values():
            term.on_optimizer_step_end(backbone, step)

    def visuals(self) -> dict:
        """Every term's visuals; a name two terms both use is prefixed with the term's name (``<term>.<name>``)."""
        per_term = {name: term.visuals() for name, term in self.terms.items()}
        counts: dict[str, int] = {}
        for images in per_term.values():
            for key in images:
                counts[key] = counts.get(key, 0) + 1
        return {(key if counts[key] == 1 else f"{name}.{key}"): value
                for name, images in per_term.items() for key, value in images.items()}

    def pair_labeller(self):
        # the data has one set of labels: at most one term may relabel it
        labellers = [(name, term.pair_labeller()) for name, term in self.terms.items()]
        labellers = [(name, labeller) for name, labeller in labellers if labeller is not None]
        if len(labellers) > 1:
            raise ConfigError(f"method.objective: terms {labellers[0][0]} and {labellers[1][0]} both relabel the "
                              "pairs; at most one term may")
        if labellers and not getattr(labellers[0][1], "orders_pairs", True) and len(self.terms) > 1:
            raise ConfigError(f"method.objective: term {labellers[0][0]} keeps each pair in its dataset order (its "
                              "label is decided per step), so another term would take the first image as the "
                              "preferred one; use a label rule that orders the pairs, or no other term")
        return labellers[0][1] if labellers else None


def build_objective(method: DictConfig, terms: DictConfig | None = None) -> Objective:
    """``method.objective``, plus the weighted terms of the ``terms`` group (``terms=[sft]``), checked key by key
    before anything is built. With no extra terms this is ``method.objective`` itself."""
    from alignment.config import check_keys, instantiate_checked

    main = instantiate_checked(method.objective, "method.objective")
    if not terms:
        return main
    parts: dict[str, Objective]
    weights: dict[str, float]
    if isinstance(main, WeightedSum):  # extend the method's own sum rather than nesting sums
        parts, weights = dict(main.terms.items()), dict(main.weights)
    else:
        name = str(method.get("name") or "main")
        parts, weights = {name: main}, {name: 1.0}
    for name in terms:
        node = terms[name]
        key = f"terms.{name}"
        if name in parts:
            raise ConfigError(f"{key}: the method already has a term called {name!r}")
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{key}: needs a _target_ and a weight (see conf/terms/)")
        options = OmegaConf.to_container(node, resolve=True)
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{key}.weight must be a finite number, got {weight!r}")
        term_node = OmegaConf.create(options)
        check_keys(term_node, key)
        parts[name] = instantiate_checked(term_node, key)
        weights[name] = float(weight)
    return WeightedSum(parts, weights)
