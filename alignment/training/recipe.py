"""The training recipe behind ``python -m alignment.run``: check the config, build the parts, ``Trainer.fit``.

Everything a user can get wrong is checked first, before any model is built, and reported as one line naming the
key, file or row (``error: method.beta must be a number, got 'abc'``): the config's plain nodes, the objective (and
its terms), whether the objective can train on the dataset (batch kind, extra columns), the scorers it asks for,
the trainer, the backbone keys. Then the backbone and the scorers are built; data that a builder makes
(``dataset.generate``) is built once — rank 0 builds, the other ranks wait — and the module, data module and
trainer are assembled. No part here names a method (docs/contract.md).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignment.errors import ConfigError


# ------------------------------------------------------------------------------------------------ checks
def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` as Trainer keyword arguments, checked (names, then the values users get wrong)."""
    import lightning as L

    from alignment.config import check_keys
    from alignment.training.schema import check_trainer_values

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}: unknown Trainer argument")
    check_trainer_values(kwargs)
    if isinstance(kwargs.get("strategy"), dict):
        check_keys(cfg.trainer.strategy, "trainer.strategy")
    return kwargs


def wanted_scorers(objective, cfg: DictConfig) -> list[str]:
    """The configured scorers the objective asks for; a missing one is a one-line error before anything loads."""
    from alignment.config import check_keys

    available = [str(name) for name in (cfg.get("scorers") or {})]
    wanted = objective.wanted_scorers(available)
    for name in wanted:
        if name not in available:
            raise ConfigError(f"scorers: {type(objective).__name__} needs the scorer {name!r} (configured: "
                              f"{', '.join(available) or 'none'}; choose them with scorers=[...])")
        check_keys(cfg.scorers[name], f"scorers.{name}")
    return wanted


# ------------------------------------------------------------------------------------------------ parts
def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from alignment.config import to_plain
    from alignment.training.callbacks import CheckpointWeights, ExportWeights, MetricsFile, SampleGrid
    from alignment.training.checkpointing import CHECKPOINT_DIR

    checkpoints = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR, filename="step={step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps), save_last=True,
        monitor="train/global_step", mode="max", save_top_k=int(cfg.checkpoint.keep_last),
        save_on_train_epoch_end=False)
    samples = cfg.samples
    return [
        checkpoints,
        MetricsFile(run_dir / "metrics.jsonl"),
        SampleGrid(run_dir / "samples", prompts=list(samples.prompts), seeds=list(samples.seeds),
                   every_n_steps=samples.every_n_steps, num_inference_steps=samples.num_inference_steps,
                   guidance_scale=samples.guidance_scale, negative_prompt=samples.get("negative_prompt", ""),
                   extras=to_plain(samples.get("extras")) or {}),
        ExportWeights(run_dir),
        *([CheckpointWeights(run_dir, every)] if (every := int(cfg.checkpoint.get("weights_every_n_steps") or 0))
          else []),
    ]


def build_trainer(cfg: DictConfig, run_dir: Path, kwargs: dict | None = None):
    """The Lightning Trainer; built before any model, so that a value Lightning refuses (an accelerator this
    machine lacks, a strategy name) is a one-line error too."""
    import lightning as L

    from alignment.config import instantiate_checked
    from alignment.loggers import build_logger
    from alignment.training.checkpointing import AtomicCheckpointIO

    kwargs = dict(kwargs if kwargs is not None else trainer_kwargs(cfg))
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = instantiate_checked(cfg.trainer.strategy, "trainer.strategy")
    logger, callbacks = build_logger(cfg, run_dir), build_callbacks(cfg, run_dir)
    try:
        return L.Trainer(**kwargs, default_root_dir=str(run_dir), logger=logger, callbacks=callbacks,
                         plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)
    except (ValueError, TypeError, RuntimeError) as err:  # Lightning's MisconfigurationException is a ValueError
        text = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"trainer: {text[:300]}") from None


def generates(cfg: DictConfig) -> bool:
    """Whether the dataset is first built by ``dataset.generate`` (an existing source file is read as it is)."""
    data = cfg.dataset
    if not data.get("generate"):
        return False
    source = Path(str(data.source)).expanduser()
    if source.is_file():
        return False
    if source.suffix == ".parquet":
        raise ConfigError(f"dataset.source: {source} does not exist (with dataset.generate set, source is the folder "
                          "the builder writes into; point it at an existing file, or a folder)")
    return True


def make_builder(cfg: DictConfig):
    """The builder ``dataset.generate`` names (its settings checked; no model built), or None."""
    from alignment.builders.base import Builder
    from alignment.config import check_keys, instantiate_checked

    if not generates(cfg):
        return None
    node = cfg.dataset.generate
    target = check_keys(node, "dataset.generate")
    extra = {"config_key": "dataset.generate"} if "config_key" in inspect.signature(target).parameters else {}
    builder = instantiate_checked(node, "dataset.generate", **extra)
    if not isinstance(builder, Builder):
        raise ConfigError(f"dataset.generate._target_: {node._target_} does not build an alignment Builder")
    return builder


def prepare_data(cfg: DictConfig, builder=None, backbone=None, scorers: dict | None = None, labeller=None,
                 run_dir: Path | None = None):
    """The dataset: read from ``dataset.source``, or first built there by ``builder`` (``make_builder``) — once,
    shared by every process (rank 0 builds, the others wait), and without disturbing the global random state (the
    LoRA initialisation that follows is the same whether the data was built now or by an earlier run).

    With an objective's pair ``labeller`` (docs/contract.md#pair-labellers) the pairs are first scored by its
    builder — once, cached beside the data, keyed by the data and the scorers' weights — and relabelled from those
    scores; the label statistics are printed, written to ``<run_dir>/labels.json`` and kept as
    ``dataset.label_stats``."""
    import torch

    from alignment.data.component import build_dataset

    data = cfg.dataset
    source = None
    if builder is not None:
        from alignment.builders.runner import ensure_built

        with torch.random.fork_rng(devices=[]):
            source = ensure_built(builder, data.source, backbone=backbone, scorers=scorers or {})
        print(f"dataset: generated pairs in {source}", file=sys.stderr)
    computed, stats = {}, None
    if labeller is not None:
        computed, stats = relabel(cfg, labeller, str(source if source is not None else data.source), scorers or {})
    dataset = build_dataset(data, source, **computed)
    skipped = getattr(dataset, "skipped_rows", [])
    if skipped:
        print(f"dataset: skipped {len(skipped)} bad row(s) of {data.source} (dataset.bad_rows=skip): rows "
              f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}", file=sys.stderr)
    if stats is not None:
        stats["dataset_rows"] = len(dataset)
        stats["bad_rows_skipped"] = len(skipped)
        dataset.label_stats = stats
        if run_dir is not None and int(os.environ.get("RANK", "0") or 0) == 0:
            from alignment.files import atomic_write_text

            plain = {k: (None if isinstance(v, float) and v != v else v) for k, v in stats.items()}  # NaN -> null
            atomic_write_text(json.dumps(plain, indent=1) + "\n", Path(run_dir) / "labels.json")
    return dataset


def relabel(cfg: DictConfig, labeller, source: str, scorers: dict) -> tuple[dict, dict]:
    """Score the pairs with the labeller's builder (cached: ``ensure_built``) and compute their labels; returns the
    dataset's computed arguments (``labels``, ``extra_values``) and the label statistics. The scorers score on
    this process's GPU when there is one and go back to the CPU afterwards."""
    import pyarrow.parquet as pq
    import torch

    from alignment.builders.runner import ensure_built
    from alignment.config import resolve_device

    data = cfg.dataset
    builder = labeller.builder(source, str(data.get("split", "train")), data.get("max_rows"),
                               data.get("hf_cache_dir"))
    used = {name: scorers[name] for name in builder.scorer_names}
    device = resolve_device("auto")
    try:
        for scorer in used.values():
            scorer.to(device)
        with torch.random.fork_rng(devices=[]):
            path = ensure_built(builder, labeller.cache_dir(source), None, used)
    finally:
        for scorer in used.values():
            scorer.to("cpu")
    result = labeller.label(pq.read_table(path))
    stats = {"scores": str(path), **result.stats}
    print(f"{labeller.describe(stats)} (scores: {path})", file=sys.stderr)
    return {"labels": result.labels, "extra_values": result.extras}, stats


def check_label_cache(cfg: DictConfig, labeller) -> None:
    """Before any model loads: the dataset reads (file, columns, rows; its own labels are not used yet) and the
    folder the labeller's scores go to can be written."""
    from alignment.data.component import build_dataset

    source = str(cfg.dataset.source)
    folder = Path(labeller.cache_dir(source))
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(f"method.label_cache: cannot write the pair scores into {folder} (read-only); set "
                          "method.label_cache=<a writable folder>")
    keep_ties = {"ties": "keep_first"} if "ties" in cfg.dataset else {}   # the source's own ties may be voted on
    if keep_ties:
        from alignment.data.pickapic import TIE_POLICIES

        if cfg.dataset.ties not in TIE_POLICIES:
            raise ConfigError(f"dataset.ties must be one of {', '.join(TIE_POLICIES)}, got {cfg.dataset.ties!r}")
    node = OmegaConf.merge(cfg.dataset, keep_ties)
    build_dataset(node)


def log_label_stats(trainer, stats: dict | None) -> None:
    """The label statistics as ``labels/*`` scalars at step 0 of every logger (W&B, CSV)."""
    if not stats:
        return
    scalars = {f"labels/{k}": float(v) for k, v in stats.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=0)


# ------------------------------------------------------------------------------------------------ train
def train(cfg: DictConfig) -> dict:
    import lightning as L

    from alignment.config import check_keys, instantiate_checked, positive_int, to_plain
    from alignment.data.component import check_objective_fits, dataset_class
    from alignment.training.reference import check_reference
    from alignment.objectives.compose import build_objective
    from alignment.scorers.base import build_scorers, check_scorer_weights, scorer_class
    from alignment.training.checkpointing import resolve_resume
    from alignment.training.datamodule import AlignmentDataModule
    from alignment.training.module import AlignmentModule
    from alignment.training.schema import check_run_config
    from alignment.training.speed import apply_speed

    run_dir = Path(cfg.output_dir)
    # 1. Checks that build nothing.
    check_run_config(cfg)
    positive_int(cfg.dataset.batch_size, "dataset.batch_size")
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    objective = build_objective(cfg.method, cfg.get("terms"))
    if objective.needs_reference:
        check_reference(cfg.method.get("reference", "auto"), cfg.method.get("finetune", "lora"))
    check_objective_fits(objective, cfg.dataset)
    if cfg.dataset.get("cache") and dataset_class(cfg.dataset).kind != "pairs":
        raise ConfigError("dataset.cache: the latent cache stores image pairs; prompt-only data has none")
    scorer_names = wanted_scorers(objective, cfg)
    # the objective vets the classes of the scorers it asked for (e.g. a reward must be differentiable)
    objective.check_scorer_classes({name: scorer_class(cfg.scorers[name]) for name in scorer_names},
                                   cfg.backbone.get("resolution"))
    labeller = objective.pair_labeller()
    configured = [str(name) for name in (cfg.get("scorers") or {})]
    label_scorers = labeller.resolve(configured) if labeller is not None else []
    kwargs = trainer_kwargs(cfg)
    check_keys(cfg.backbone, "backbone")
    builder = make_builder(cfg)
    if builder is not None:  # the scorers it reads are configured and fit the backbone's resolution (no model yet)
        from alignment.builders.runner import check_scorer_config

        check_scorer_config(builder, cfg.get("scorers"),
                            cfg.backbone.get("resolution") if builder.needs_backbone else None)
    builder_scorers = [n for n in (getattr(builder, "scorer_names", ()) or ()) if n in configured]
    names = list(dict.fromkeys(scorer_names + builder_scorers + label_scorers))
    for name in names:  # a builder may bring its own (the toy judge); it names what it lacks itself
        check_keys(cfg.scorers[name], f"scorers.{name}")
        check_scorer_weights(cfg.scorers[name], f"scorers.{name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, run_dir, kwargs)

    # 2. Data that needs no model is read now (a bad file fails before any model loads), then the models.
    # data that needs no model (a file, or a builder without backbone or scorers) is ready before any model loads
    needs_models = (builder is not None and (builder.needs_backbone or bool(builder_scorers))) or bool(label_scorers)
    if labeller is not None and builder is None:  # a source that cannot be read fails before any model loads
        check_label_cache(cfg, labeller)
    dataset = None if needs_models else prepare_data(cfg, builder, run_dir=run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = instantiate_checked(cfg.backbone, "backbone")
    scorers = build_scorers({name: cfg.scorers[name] for name in names}) if names else {}
    if dataset is None:
        dataset = prepare_data(cfg, builder, backbone, scorers, labeller=labeller, run_dir=run_dir)
    module = AlignmentModule(backbone, objective, finetune=cfg.method.finetune, lora=to_plain(cfg.method.get("lora")),
                             optimizer=to_plain(cfg.method.optimizer), lr_scheduler=to_plain(cfg.method.lr_scheduler),
                             seed=cfg.seed, gradient_checkpointing=cfg.method.get("gradient_checkpointing", False),
                             reference=cfg.method.get("reference", "auto"),
                             scorers={name: scorers[name] for name in scorer_names})
    label_stats = getattr(dataset, "label_stats", None)
    for name in set(scorers) - set(scorer_names):  # scorers that only labelled or built data: not kept for training
        del scorers[name]
    apply_speed(backbone, to_plain(cfg.speed), cfg.trainer.get("accelerator"))
    if cfg.dataset.get("cache"):
        from alignment.data.cache import cached_pairs

        dataset = cached_pairs(dataset, backbone, cfg.dataset)
    datamodule = AlignmentDataModule(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.num_workers,
                                seed=cfg.seed)

    # 3. Fit.
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path is None:  # a resumed run logged them at its start
        log_label_stats(trainer, label_stats)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    summary = {"run_dir": str(run_dir), "steps": trainer.global_step,
               "metrics": str(run_dir / "metrics.jsonl"),
               "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}}
    if trainer.is_global_zero:
        from alignment.training.callbacks import EXPORTED

        exported = [run_dir / name for name in EXPORTED if (run_dir / name).exists()]
        print(f"done: {trainer.global_step} steps; run folder {run_dir}; weights {', '.join(map(str, exported))}; "
              f"metrics {run_dir / 'metrics.jsonl'}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
