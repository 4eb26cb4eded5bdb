"""Callbacks: the metrics file, validation sample grids, and exporting trained weights (docs/contract.md)."""

from __future__ import annotations

import json
import re
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L

from alignment.files import atomic_write, save_png
from alignment.sampling.sample import image_grid, sample_images, to_pil
from alignment.training.lora import save_lora


def _step_advanced(trainer, last_step: int) -> bool:
    return trainer.global_step != last_step


class MetricsFile(L.Callback):
    """``metrics.jsonl`` in the run folder: one line per optimizer step with every ``train/*`` scalar and the wall
    clock ``time`` (rank 0,
    values already averaged over processes). A resumed run drops lines past its checkpoint, so the file always
    describes one consistent run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= trainer.global_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _step_advanced(trainer, self._last_step):
            return
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        record = {"step": trainer.global_step, "time": round(time.time(), 4)}  # wall clock: throughput
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and key != "train/global_step":
                record[key[len("train/"):]] = float(value)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and before the first step) sample the validation prompts with fixed seeds and save
    a grid (rows = prompts, columns = seeds) to ``samples/step_XXXXXX.png``, logging it to W&B when active. With it,
    the objective's ``visuals()`` (images of its own, e.g. mask overlays; none by default) are saved as
    ``samples/<name>_step_XXXXXX.png`` and logged under ``<name>`` (docs/contract.md#objectives).

    The objective's conditioner (if any) conditions the samples, with ``extras`` (one value per prompt) as its
    per-sample inputs (an extra it does not give is None). Under FSDP every process samples the same grid — a
    sharded model needs every rank in each forward — and rank 0 writes it; otherwise rank 0 alone samples."""

    def __init__(self, folder: str | Path, prompts: list[str], seeds: list[int], every_n_steps: int = 100,
                 num_inference_steps: int = 20, guidance_scale: float = 5.0, negative_prompt: str = "",
                 extras: dict[str, list] | None = None):
        self.folder = Path(folder)
        self.prompts = list(prompts)
        self.seeds = [int(s) for s in seeds]
        self.every_n_steps = int(every_n_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt or "")
        self.extras = {name: list(values) for name, values in (extras or {}).items()}
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if trainer.global_step == 0:
            self._make_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _step_advanced(trainer, self._last_step):
            return
        self._last_step = trainer.global_step
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._make_grid(trainer, pl_module)

    def sample(self, pl_module):
        """The grid's images (prompt-major, one per (prompt, seed)) from the module's current model."""
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        conditioner = pl_module.objective.conditioner
        per_prompt = {name: [None] * len(self.prompts) for name in getattr(conditioner, "extras", ())}
        per_prompt.update(self.extras)  # samples.extras; an extra it does not give is None ("no extra input")
        extras = {name: [v for v in values for _ in self.seeds] for name, values in per_prompt.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            return sample_images(pl_module.backbone, prompts, seeds, self.num_inference_steps, self.guidance_scale,
                                 negative_prompt=self.negative_prompt, conditioner=conditioner, extras=extras)
        finally:
            pl_module.train(was_training)

    def _make_grid(self, trainer, pl_module) -> None:
        if not self.prompts or self.every_n_steps <= 0:
            return
        sharded = is_sharded(trainer)
        if not sharded and not trainer.is_global_zero:
            return  # an unsharded model is whole on rank 0: the other ranks need not sample
        with full_parameters(trainer) if sharded else nullcontext():
            images = self.sample(pl_module)  # every rank of a sharded model takes part (see the class docstring)
        if not trainer.is_global_zero:
            return
        grid = image_grid(to_pil(images), columns=len(self.seeds))
        self.folder.mkdir(parents=True, exist_ok=True)
        save_png(grid, self.folder / f"step_{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key="samples", images=[grid], step=trainer.global_step,
                                 caption=[" | ".join(self.prompts)])
        self._save_visuals(trainer, pl_module)

    def _save_visuals(self, trainer, pl_module) -> None:
        """The objective's ``visuals()``, each tiled into one image, saved and logged beside the grid (rank 0)."""
        visuals = getattr(pl_module.objective, "visuals", None)
        for name, images in ((visuals() if visuals is not None else None) or {}).items():
            if not isinstance(name, str) or not VISUAL_NAME.fullmatch(name):
                raise ValueError(f"objective.visuals(): names must be letters, digits, '_', '.', '-', got {name!r}")
            image = visual_image(images, name)
            save_png(image, self.folder / f"{name}_step_{trainer.global_step:06d}.png")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):  # WandbLogger
                    logger.log_image(key=name, images=[image], step=trainer.global_step)


VISUAL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def visual_image(images, name: str = "visual"):
    """One PIL image from an objective's visual in [0, 1]: (3, H, W), a row (N, 3, H, W) or a grid (rows, columns,
    3, H, W), tiled row by row."""
    images = images.detach().float()
    if images.ndim == 3:
        images = images[None, None]
    elif images.ndim == 4:
        images = images[None]
    if images.ndim != 5 or images.shape[2] != 3 or images.shape[0] * images.shape[1] == 0:
        raise ValueError(f"objective.visuals()[{name!r}] must be (3, H, W), (N, 3, H, W) or (rows, columns, 3, H, W) "
                         f"images, got shape {tuple(images.shape)}")
    rows, columns = images.shape[:2]
    return image_grid(to_pil(images.reshape(rows * columns, *images.shape[2:])), columns=columns)


def is_sharded(trainer) -> bool:
    """Whether the model is sharded over processes (FSDP): then every rank must take part in its forward passes."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(getattr(trainer.strategy, "model", None), FullyShardedDataParallel)


def full_parameters(trainer):
    """Outside the training step a sharded (FSDP) model's root holds only this rank's shard of the parameters that
    no inner unit wraps; calling submodules directly (as sampling does) needs them whole: gather them for the block
    (every rank takes part)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)


class ExportWeights(L.Callback):
    """At the end of training write what was trained in loadable, safetensors form (docs/contract.md#run-folders):
    the LoRA adapter as ``lora/pytorch_lora_weights.safetensors`` (stock ``load_lora_weights`` reads it), the full
    UNet as ``unet/`` in diffusers layout, the objective's conditioner as ``conditioner/``, plus anything the
    objective exports itself.

    The weights come from the strategy's full state dict, which every process takes part in building (FSDP gathers
    its shards there); rank 0 writes the files."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP: every rank calls it
        if trainer.is_global_zero:
            export(pl_module, self.run_dir, state)


EXPORTED = ("lora", "unet", "conditioner")


def _sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def module_prefix(root, module) -> str:
    """The state-dict prefix of ``module`` inside ``root`` (``objective.conditioner.``)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not part of {type(root).__name__}")


def export(pl_module, run_dir: Path, state: dict | None = None) -> dict[str, Path]:
    """Write the trained parts from ``state`` (the module's full state dict; default: the live module's)."""
    from safetensors.torch import save_file

    state = pl_module.state_dict() if state is None else state
    written = {}
    unet = pl_module.backbone.unet
    unet_state = _sub_state(state, module_prefix(pl_module, unet))
    if pl_module.finetune == "lora":
        written["lora"] = save_lora(unet, run_dir / "lora", state_dict=unet_state)
    elif pl_module.finetune == "full":
        folder = run_dir / "unet"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet_state.items()}
        atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        unet.save_config(str(folder))
        written["unet"] = folder
    conditioner = pl_module.objective.conditioner
    if conditioner is not None:
        written["conditioner"] = conditioner.save_pretrained(
            run_dir / "conditioner", state_dict=_sub_state(state, module_prefix(pl_module, conditioner)))
    export_objective = getattr(pl_module.objective, "export", None)
    if export_objective is not None:
        written.update(export_objective(run_dir) or {})
    return written


class CheckpointWeights(L.Callback):
    """Every ``every_n_steps`` optimizer steps, and when training ends, write the trained weights as a loadable run
    folder of their own, ``<run>/checkpoints/step_NNNNNN/`` (``alignment.training.checkpointing.weights_folder``):
    the same ``export`` the end of training uses (LoRA / full UNet / conditioner, safetensors), a copy of the run's
    ``config.yaml`` (so recorded inference settings and the base weights travel with it) and ``step.json``. Evaluating
    these gives curves over training (``python -m alignment.evaluate_checkpoints``). The folder is written under a
    temporary name and renamed, so a listed step is always complete; every export is kept."""

    def __init__(self, run_dir: str | Path, every_n_steps: int):
        self.run_dir = Path(run_dir)
        self.every_n_steps = int(every_n_steps)
        self._last_step = -1
        self._saved_step = -1   # every rank keeps it (not the file system): they all take part in each save

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _step_advanced(trainer, self._last_step):
            return
        self._last_step = trainer.global_step
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and self._saved_step != trainer.global_step:
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        import shutil

        from alignment.training.checkpointing import STEP_FILE, weights_folder

        state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP: every rank calls it
        self._saved_step = step = trainer.global_step
        if not trainer.is_global_zero:
            return
        final = weights_folder(self.run_dir, step)
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export(pl_module, tmp, state)
        if (self.run_dir / "config.yaml").is_file():
            shutil.copyfile(self.run_dir / "config.yaml", tmp / "config.yaml")
        (tmp / STEP_FILE).write_text(json.dumps({"step": step, "time": round(time.time(), 4)}) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a resumed run writes the same step again
        tmp.rename(final)
