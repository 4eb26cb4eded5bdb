"""The dataset as a config component (docs/contract.md#data).

``conf/dataset/<name>.yaml`` holds a ``_target_`` (the dataset class) with its arguments, plus the keys the training
loop reads itself (``LOADER_KEYS``: batch size, workers, the latent cache, ``generate``). The class says what kind
of batches it makes (``kind = "pairs" | "prompts"``); its ``extra_columns`` argument names per-sample columns that
reach the objective. ``dataset_class`` and ``check_objective_fits`` check all of it — unknown keys, types, the
objective's batch kind and the extras it needs — before any data is read or model loaded.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignment.errors import ConfigError

LOADER_KEYS = {
    "name": str, "generate": Any, "batch_size": int, "num_workers": int, "cache": bool, "cache_dir": Any,
    "cache_dtype": Any, "cache_batch_size": int, "cache_device": Any,
}


def dataset_options(node: DictConfig) -> DictConfig:
    """The node without the loader keys: what the dataset class receives."""
    from omegaconf.errors import OmegaConfBaseException

    options = {}
    for key in node:
        if key in LOADER_KEYS:
            continue
        try:  # resolved one by one, so an interpolation that cannot resolve is named
            value = node[key]
            options[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as err:
            raise ConfigError(f"dataset.{key}: {str(err).splitlines()[0]} (set dataset.{key} explicitly)") from None
    return OmegaConf.create(options)


def dataset_class(node: DictConfig):
    """The class ``dataset._target_`` names (checked: keys of its signature plus the loader keys, and their types)."""
    from alignment.config import check_keys, check_schema, positive_int

    if node is None or "_target_" not in node:
        raise ConfigError("dataset._target_: missing (conf/dataset/*.yaml name the dataset class, e.g. "
                          "alignment.data.pickapic.PreferencePairs)")
    # resolved while still attached to the run config: a ${...} inside e.g. dataset.generate cannot resolve detached
    loader = {k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k]) else node[k]
              for k in node if k in LOADER_KEYS}
    check_schema(OmegaConf.create(loader), LOADER_KEYS, "dataset")
    target = check_keys(dataset_options(node), "dataset")
    positive_int(node.get("batch_size", 1), "dataset.batch_size")
    if getattr(target, "kind", None) not in ("pairs", "prompts"):
        raise ConfigError(f"dataset._target_: {node._target_} does not declare kind = 'pairs' or 'prompts'")
    return target


def check_objective_fits(objective, node: DictConfig) -> None:
    """One-line errors, before any model loads, when the objective cannot train on this dataset: a prompt-only
    objective on pairs or the reverse, or an extra column it needs that the dataset does not carry."""
    target = dataset_class(node)
    kind = target.kind
    name = node.get("name", node._target_)
    if objective.batch_kind != kind:
        hint = ("e.g. dataset=prompts dataset.source=<prompt file>" if objective.batch_kind == "prompts"
                else "e.g. dataset=pickapic or dataset=toy_pairs")
        raise ConfigError(f"dataset: {type(objective).__name__} trains on {objective.batch_kind} but dataset={name} "
                          f"gives {kind} ({hint})")
    carried = list(node.get("extra_columns") or [])
    labeller = objective.pair_labeller()
    provided = tuple(getattr(labeller, "extras", ()) or ())  # computed by the method's pair labeller
    missing = [column for column in objective.required_extras() if column not in carried + list(provided)]
    if missing:
        raise ConfigError(f"dataset.extra_columns: {type(objective).__name__} needs the per-sample column "
                          f"{missing[0]!r} (add it: dataset.extra_columns=[{', '.join(carried + missing)}])")


def build_dataset(node: DictConfig, source: str | None = None, **computed):
    """Instantiate the dataset (with ``source`` replaced, e.g. by the file ``dataset.generate`` built; ``computed``:
    arguments that come from code, not the config — a pair labeller's ``labels`` and ``extra_values``)."""
    from alignment.config import check_keys, instantiate_checked

    options = dataset_options(node)
    if source is not None:
        options.source = str(source)
    if not computed:
        return instantiate_checked(options, "dataset")
    # called directly: Hydra would merge a million labels into an OmegaConf node first
    target = check_keys(options, "dataset")
    kwargs = {k: v for k, v in OmegaConf.to_container(options, resolve=True).items() if k != "_target_"}
    return target(**kwargs, **computed)


def collate_fn(dataset):
    """How a dataset's items become a batch: its own ``collate_fn`` (the latent cache), else by kind."""
    from alignment.data.pickapic import collate_pairs
    from alignment.data.prompts import collate_prompts

    own = getattr(dataset, "collate_fn", None)
    if own is not None:
        return own
    return collate_prompts if getattr(dataset, "kind", "pairs") == "prompts" else collate_pairs
