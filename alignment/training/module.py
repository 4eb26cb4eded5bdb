"""The one generic LightningModule: it trains whatever objective it is given, on whatever backbone.

It owns the parts every method shares — what is trainable (LoRA through peft, the full UNet, or only the objective's
own modules), the reference strategy (``method.reference``), the frozen helpers an objective asks for (scorers:
moved to the training device, never trained, never checkpointed), turning a data batch (pairs or prompts, with
their extras) into latents and conditioning (through the objective's conditioner, if it has one), the optimizer
and schedule over exactly the trainable parameters, logging, the non-finite loss guard and what goes into
checkpoints — so that a new method is one objective file plus one YAML, with no edit here (docs/contract.md).
"""

from __future__ import annotations

import lightning as L
import torch

from alignment.conditioning import condition
from alignment.errors import ConfigError, TrainingError
from alignment.objectives.base import Objective, PairBatch, PromptBatch, sample_seed
from alignment.training.callbacks import module_prefix
from alignment.training.lora import add_lora
from alignment.training.reference import make_reference
from alignment.training.speed import make_optimizer

FINETUNE_MODES = ("lora", "full", "none")
# VAE posterior noise has its own streams so it never coincides with the diffusion noise (stream 0/1).
VAE_NOISE_STREAM_W, VAE_NOISE_STREAM_L = 2, 3


class AlignmentModule(L.LightningModule):
    def __init__(self, backbone, objective: Objective, finetune: str = "lora", lora: dict | None = None,
                 optimizer: dict | None = None, lr_scheduler: dict | None = None, seed: int = 0,
                 gradient_checkpointing: bool = False, reference: str = "auto", scorers: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.seed = int(seed)
        self.optimizer_cfg = dict(optimizer or {})
        self.lr_scheduler_cfg = dict(lr_scheduler or {})
        # Checkpoints hold only what training changes (see on_save_checkpoint); the frozen rest is rebuilt.
        self.strict_loading = False

        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"method.finetune: {finetune!r} is not one of {', '.join(FINETUNE_MODES)}")
        self.finetune = finetune
        if finetune == "lora":
            add_lora(backbone.unet, **(lora or {}))
        elif finetune == "full":
            backbone.unet.requires_grad_(True)
        if objective.needs_reference:
            backbone.use_reference(make_reference(reference, backbone.unet, finetune))
        if gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        objective.setup(backbone, scorers or {})
        if not self.trainable_parameters():
            raise ConfigError(f"nothing to train: method.finetune={finetune!r} and the objective "
                              f"{type(objective).__name__} has no trainable parameters")
        stray = sorted({name for name, p in self.named_parameters() if p.requires_grad}
                       - set(self.trainable_names()))
        if stray:  # a parameter that would silently never train (or a frozen part left unfrozen by mistake)
            raise ConfigError(f"{stray[0]} requires grad but is neither the UNet adapter / UNet nor listed by "
                              f"{type(objective).__name__}.trainable_parameters()")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates and the checkpoint holds: the UNet's trainable parameters (its LoRA adapter,
        or all of it for a full fine-tune) plus ``objective.trainable_parameters()`` — nothing else."""
        params, seen = [], set()
        for param in [*(p for p in self.backbone.unet.parameters() if p.requires_grad),
                      *self.objective.trainable_parameters()]:
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
        return params

    def trainable_names(self) -> list[str]:
        wanted = {id(p) for p in self.trainable_parameters()}
        return [name for name, p in self.named_parameters() if id(p) in wanted]

    def on_fit_start(self) -> None:
        # frozen helpers (scorers, ...) are not submodules: move them to the training device and dtype here
        for module in self.objective.frozen_modules().values():
            module.to(self.device, self.backbone.weight_dtype)

    # ---------------------------------------------------------------------------------------------- batches
    def _latents(self, pixels: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
        """VAE latents with the posterior noise drawn per sample from (seed, step, row), like the diffusion noise."""
        mean, std = self.backbone.encode_moments(pixels)
        return self.backbone.latents_from_moments(mean, std, self._vae_noise(index, mean.shape[1:], stream))

    def _vae_noise(self, index: torch.Tensor, shape, stream: int) -> torch.Tensor:
        noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(
            sample_seed(self.seed, self.global_step, int(row), stream))) for row in index.tolist()]
        return torch.stack(noise).to(self.device)

    def to_batch(self, batch: dict) -> PairBatch | PromptBatch:
        """A collated batch -> the objective's input: pairs (pixels or cached moments -> latents) or prompts, with
        the frozen prompt conditioning (cached or encoded here), passed through the objective's conditioner."""
        index = torch.as_tensor(batch["index"]).cpu()
        captions = list(batch.get("caption", []))
        extras = batch.get("extras", {})
        cached = {k[len("cond."):]: v for k, v in batch.items() if k.startswith("cond.")}
        prompt_cond = cached or self.backbone.encode_prompt(captions)
        if "moments_w" not in batch and "pixel_values_w" not in batch:
            cond = condition(self.backbone, captions, extras, self.objective.conditioner, prompt_cond)
            return PromptBatch(captions=captions, cond=cond, index=index, step=int(self.global_step),
                               extras=extras, prompt_cond=prompt_cond)
        if "moments_w" in batch:  # latent cache: posterior (mean, std) stored, sampled here per step
            mean_w, std_w = batch["moments_w"].chunk(2, dim=1)
            mean_l, std_l = batch["moments_l"].chunk(2, dim=1)
            latents_w = self.backbone.latents_from_moments(mean_w, std_w, self._vae_noise(
                index, mean_w.shape[1:], VAE_NOISE_STREAM_W))
            latents_l = self.backbone.latents_from_moments(mean_l, std_l, self._vae_noise(
                index, mean_l.shape[1:], VAE_NOISE_STREAM_L))
        else:
            latents_w = self._latents(batch["pixel_values_w"], index, VAE_NOISE_STREAM_W)
            latents_l = self._latents(batch["pixel_values_l"], index, VAE_NOISE_STREAM_L)
        prompt_cond = {**prompt_cond, **self.backbone.image_conditioning(batch)}  # e.g. SDXL's per-sample time_ids
        cond = condition(self.backbone, captions, extras, self.objective.conditioner, prompt_cond)
        return PairBatch(latents_w=latents_w, latents_l=latents_l, cond=cond, index=index,
                         step=int(self.global_step), captions=captions, extras=extras, prompt_cond=prompt_cond)

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = self.to_batch(batch)
        out = self.objective(self.backbone, inputs, self.seed)
        if not torch.isfinite(out.loss):
            rows = inputs.index.tolist()
            raise TrainingError(f"loss is {out.loss.item()} at step {self.global_step} (dataset rows {rows}); "
                                "stopping — lower method.optimizer.lr or method.beta, or check the data")
        batch_size = inputs.batch_size
        self.log("train/loss", out.loss.detach(), prog_bar=True, sync_dist=True, batch_size=batch_size)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "implicit_acc", sync_dist=True, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        self.log("train/global_step", float(self.global_step), batch_size=batch_size)
        return out.loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # Called once per optimizer step (after gradient accumulation), before any callback sees the step: a
        # reference refreshed here is what the checkpoint written at this step holds. Lightning counts the step
        # as completed only after this returns, so this is step global_step + 1.
        super().optimizer_step(*args, **kwargs)
        self.objective.on_optimizer_step_end(self.backbone, self.global_step + 1)

    # -------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        cfg = {"name": "adamw", "lr": 1e-5, "weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
               "scale_lr": False, **self.optimizer_cfg}
        lr = float(cfg["lr"])
        if not lr > 0:
            raise ConfigError(f"method.optimizer.lr must be > 0, got {cfg['lr']}")
        if cfg["scale_lr"]:  # Diffusion-DPO's --scale_lr: lr × total batch (world × micro-batch × accumulation)
            micro_batch = self.trainer.datamodule.batch_size
            lr *= self.trainer.world_size * micro_batch * self.trainer.accumulate_grad_batches
        optimizer = make_optimizer(cfg["name"], self.trainable_parameters(), lr=lr, betas=tuple(cfg["betas"]),
                                   weight_decay=float(cfg["weight_decay"]), eps=float(cfg["eps"]))
        sched = {"name": "constant_with_warmup", "warmup_steps": 0, **self.lr_scheduler_cfg}
        try:
            shape = {k: sched[k] for k in ("num_cycles", "power") if k in sched}  # cosine restarts, polynomial
            scheduler = get_scheduler(sched["name"], optimizer, num_warmup_steps=int(sched["warmup_steps"]),
                                      num_training_steps=max(int(self.trainer.max_steps), 1), **shape)
        except ValueError as err:
            raise ConfigError(f"method.lr_scheduler.name: {sched['name']!r} — {str(err).splitlines()[0]}") from err
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_keys(self, state_dict: dict) -> list[str]:
        """What a checkpoint holds: the trainable parameters, every LoRA tensor (incl. the frozen snapshot
        reference adapter), the reference strategy's own state once it has been refreshed (so a resumed run
        compares against the same reference) and the objective's buffers (e.g. counters). Frozen helpers are not
        submodules, so never here."""
        keep = set(self.trainable_names())
        keep |= {f"objective.{name}" for name, _ in self.objective.named_buffers()}
        reference = getattr(self.backbone, "reference", None)
        if reference is not None:
            prefix = module_prefix(self, reference)
            keep |= {prefix + name for name in reference.checkpoint_names()}
        return [k for k in state_dict if k in keep or "lora_" in k]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: state[k] for k in self.checkpoint_keys(state)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        expected = set(self.checkpoint_keys(own))
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(f"resume: checkpoint lacks {len(missing)} trained tensor(s), e.g. {missing[0]} — "
                              "was it written by a different method or backbone config?")
        for key, value in checkpoint["state_dict"].items():
            if key in own and own[key].shape != value.shape:
                raise ConfigError(f"resume: checkpoint tensor {key} has shape {tuple(value.shape)}, "
                                  f"this config expects {tuple(own[key].shape)}")

