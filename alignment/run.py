"""Training entry point: compose the config, build the parts, ``Trainer.fit``.

    python -m alignment.run method=dpo backbone=tiny
    python -m alignment.run -m method.beta=1000,5000          # Hydra sweep, one folder per job
    python -m alignment.run --cfg job                         # print the composed config

Everything a user can get wrong is checked before training starts (dataset, then backbone, then trainer) and
reported as one line naming the key, file or row: ``error: method.beta must be > 0, got -1.0``.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignment.cli import entry_point
from alignment.errors import ConfigError

def generate_pairs(data: DictConfig) -> str:
    """``dataset.generate``: a callable (``_target_``, default the synthetic Pick-a-Pic file) called with
    ``path=dataset.source`` and the node's other keys; it writes the data once and returns the file to read."""
    from alignment.config import check_keys

    options = OmegaConf.to_container(data.generate, resolve=True)  # resolved in place: keys may point elsewhere
    options.setdefault("_target_", "alignment.data.synthetic.ensure_synthetic_pairs")
    make = check_keys(OmegaConf.create(options), "dataset.generate")
    options.pop("_target_")
    source = make(path=data.source, **options)
    if str(source) != str(data.source):
        print(f"dataset: generated pairs in {source}", file=sys.stderr)
    return str(source)


def build_dataset(cfg: DictConfig):
    from alignment.data.pickapic import PreferencePairs

    data = cfg.dataset
    source = data.source
    if data.get("generate"):
        source = generate_pairs(data)
    dataset = PreferencePairs(
        source=str(source), split=data.split, resolution=data.resolution, center_crop=data.center_crop,
        random_flip=data.random_flip, ties=data.ties, proportion_empty_prompts=data.proportion_empty_prompts,
        bad_rows=data.bad_rows, check_images=data.check_images, max_rows=data.max_rows, seed=cfg.seed)
    if dataset.skipped_rows:
        print(f"dataset: skipped {len(dataset.skipped_rows)} bad row(s) of {data.source} "
              f"(dataset.bad_rows=skip): rows {dataset.skipped_rows[:10]}{' ...' if len(dataset.skipped_rows) > 10 else ''}",
              file=sys.stderr)
    return dataset


def build_logger(cfg: DictConfig, run_dir: Path):
    from alignment.config import instantiate_checked

    node = cfg.logger
    if node is None or node.get("_target_") is None:
        return False
    if "Wandb" in node._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if node.get("offline", False):
            os.environ["WANDB_MODE"] = "offline"  # also stops wandb from ever asking to log in
    return instantiate_checked(node, "logger")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from alignment.training.callbacks import ExportWeights, MetricsFile, SampleGrid
    from alignment.training.checkpointing import CHECKPOINT_DIR

    keep = int(cfg.checkpoint.keep_last)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR, filename="step={step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps), save_last=True,
        monitor="train/global_step", mode="max", save_top_k=keep, save_on_train_epoch_end=False)
    samples = cfg.samples
    return [
        checkpoints,
        MetricsFile(run_dir / "metrics.jsonl"),
        SampleGrid(run_dir / "samples", prompts=list(samples.prompts), seeds=list(samples.seeds),
                   every_n_steps=samples.every_n_steps, num_inference_steps=samples.num_inference_steps,
                   guidance_scale=samples.guidance_scale),
        ExportWeights(run_dir),
    ]


def trainer_kwargs(cfg: DictConfig) -> dict:
    """``cfg.trainer`` as Trainer keyword arguments, checked (cheap: run before any data is generated or loaded)."""
    import lightning as L

    from alignment.config import check_keys, require_positive_int

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    require_positive_int(kwargs.get("max_steps"), "trainer.max_steps")
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}: unknown Trainer argument")
    if isinstance(kwargs.get("strategy"), dict):
        check_keys(cfg.trainer.strategy, "trainer.strategy")
    return kwargs


def build_trainer(cfg: DictConfig, run_dir: Path):
    import lightning as L

    from alignment.config import instantiate_checked
    from alignment.training.checkpointing import AtomicCheckpointIO

    kwargs = trainer_kwargs(cfg)
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = instantiate_checked(cfg.trainer.strategy, "trainer.strategy")
    return L.Trainer(**kwargs, default_root_dir=str(run_dir), logger=build_logger(cfg, run_dir),
                     callbacks=build_callbacks(cfg, run_dir), plugins=[AtomicCheckpointIO()],
                     use_distributed_sampler=False)


def train(cfg: DictConfig) -> dict:
    import lightning as L

    from alignment.config import check_keys, instantiate_checked, require_positive_int, to_plain
    from alignment.training.checkpointing import resolve_resume
    from alignment.training.datamodule import PairDataModule
    from alignment.training.module import AlignmentModule

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    require_positive_int(cfg.dataset.batch_size, "dataset.batch_size")
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    # Cheap checks first: the objective's hyper-parameters, the trainer and backbone keys, then the data (which may
    # be generated: minutes), before any model is built.
    objective = instantiate_checked(cfg.method.objective, "method.objective")
    trainer_kwargs(cfg)
    check_keys(cfg.backbone, "backbone")
    dataset = build_dataset(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = instantiate_checked(cfg.backbone, "backbone")
    module = AlignmentModule(backbone, objective, finetune=cfg.method.finetune, lora=to_plain(cfg.method.get("lora")),
                             optimizer=to_plain(cfg.method.optimizer), lr_scheduler=to_plain(cfg.method.lr_scheduler),
                             seed=cfg.seed, gradient_checkpointing=cfg.method.get("gradient_checkpointing", False))
    from alignment.training.speed import apply_speed

    apply_speed(backbone, to_plain(cfg.speed), cfg.trainer.get("accelerator"))
    if cfg.dataset.get("cache"):
        from alignment.data.cache import cached_pairs

        dataset = cached_pairs(dataset, backbone, cfg.dataset)
    datamodule = PairDataModule(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.num_workers,
                                seed=cfg.seed)
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    summary = {"run_dir": str(run_dir), "steps": trainer.global_step,
               "metrics": str(run_dir / "metrics.jsonl"),
               "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}}
    if trainer.is_global_zero:
        exported = [p for p in (run_dir / "lora", run_dir / "unet") if p.exists()]
        print(f"done: {trainer.global_step} steps; run folder {run_dir}; weights {', '.join(map(str, exported))}; "
              f"metrics {run_dir / 'metrics.jsonl'}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@entry_point("config")
def main(cfg: DictConfig):
    return train(cfg)


if __name__ == "__main__":
    main()
