"""What a training config may hold, checked before anything is built (docs/contract.md#configs-are-checked).

A misspelt key inside a YAML file (``weight_decy`` in an optimizer block, ``rnak`` in a LoRA block, ``trainr`` at the
top of an experiment file) or a value of the wrong type or range is a one-line ``ConfigError`` naming the key —
the same treatment the command line gets from ``alignment.cli`` — instead of being silently ignored or failing
later with a raw TypeError. Nodes with a ``_target_`` are checked against their target's signature
(``alignment.config.check_keys``); the plain nodes below against these schemas.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from alignment.config import check_schema, check_signature_keys, number, positive_int
from alignment.errors import ConfigError

GROUPS = ("backbone", "method", "dataset", "scorers", "terms", "trainer", "logger")
TOP_LEVEL = {"seed": int, "resume": Any, "output_dir": str, "speed": dict, "checkpoint": dict, "samples": dict,
             "paths": dict, **{group: Any for group in GROUPS}}
METHOD = {"name": str, "objective": dict, "finetune": Literal["lora", "full", "none"],
          "reference": Literal["auto", "base", "frozen_copy", "snapshot"], "gradient_checkpointing": bool,
          "lora": Any, "optimizer": dict, "lr_scheduler": dict, "inference": dict}
# method.inference: how the trained model is meant to be sampled (e.g. HG-DPO's LoRA scale 0.5). Training does not
# use it; the run's config.yaml records it and alignment.runs reads it back as the default lora_scale / lan of
# generate and evaluate (an explicit value wins).
INFERENCE = {"lora_scale": float | None, "lan": bool | None}
OPTIMIZER = {"name": Literal["adamw", "adamw8bit"], "lr": float, "weight_decay": float, "betas": list[float],
             "eps": float, "scale_lr": bool}
LR_SCHEDULER = {"name": str, "warmup_steps": int, "num_cycles": float, "power": float}
SAMPLES = {"every_n_steps": int, "prompts": list[str], "seeds": list[int], "num_inference_steps": int,
           "guidance_scale": float, "negative_prompt": str, "extras": dict | None}
SPEED = {"attention": Literal["sdpa", "eager"], "channels_last": bool | Literal["auto"],
         "compile": bool | Literal["auto"], "compile_mode": str | None}
CHECKPOINT = {"every_n_steps": int, "keep_last": int, "weights_every_n_steps": int}


def _method_hyperparameters(cfg: DictConfig) -> None:
    """Keys of ``method`` beyond the schema are the method's hyper-parameters (``beta``, ``share_noise``): each must
    be used by the method's parts (``${method.<key>}``), so a misspelt one in a method file is caught."""
    method = cfg.method
    raw = "".join(OmegaConf.to_yaml(node, resolve=False) for node in (method, cfg.get("terms"))
                  if isinstance(node, DictConfig))
    used = set(re.findall(r"\$\{method\.([A-Za-z0-9_]+)", raw))
    for key in method:
        if key in METHOD or key in used:
            continue
        raise ConfigError(f"method.{key}: unknown key (not a method setting — {', '.join(sorted(METHOD))} — and "
                          f"no part of the method uses ${{method.{key}}})")


def check_devices(value) -> None:
    """Lightning's forms: a count >= 1, -1 (all), "auto", a list of device ids, or a string of them ("0,1")."""
    if value in ("auto", -1, "-1") or (isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*,?", value.strip())
                                       and value.strip() not in ("0", "0,")):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return
    raise ConfigError(f"trainer.devices must be a positive integer, -1 (all), 'auto' or a list of device ids, "
                      f"got {value!r}")


def check_trainer_values(kwargs: dict) -> None:
    positive_int(kwargs.get("max_steps"), "trainer.max_steps")
    if "accumulate_grad_batches" in kwargs:
        positive_int(kwargs["accumulate_grad_batches"], "trainer.accumulate_grad_batches")
    if "devices" in kwargs:
        check_devices(kwargs["devices"])
    clip = kwargs.get("gradient_clip_val")
    if clip is not None and number(clip, "trainer.gradient_clip_val") < 0:
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 or null, got {clip}")


def check_run_config(cfg: DictConfig) -> None:
    """Every plain node of a training config (the ``_target_`` nodes are checked where they are built)."""
    _top_level(cfg)
    check_schema(cfg.method, METHOD, "method", open_keys=True)
    _method_hyperparameters(cfg)
    method = cfg.method
    if method.get("finetune", "lora") == "lora":
        from alignment.training.lora import add_lora

        check_signature_keys(method.get("lora"), add_lora, "method.lora")
    check_schema(method.get("inference"), INFERENCE, "method.inference")
    optimizer = method.get("optimizer")
    check_schema(optimizer, OPTIMIZER, "method.optimizer")
    if optimizer is not None:
        if "lr" in optimizer and not number(optimizer.lr, "method.optimizer.lr") > 0:
            raise ConfigError(f"method.optimizer.lr must be > 0, got {optimizer.lr}")
        if "betas" in optimizer and (len(optimizer.betas) != 2 or not all(0 <= b < 1 for b in optimizer.betas)):
            raise ConfigError(f"method.optimizer.betas must be two numbers in [0, 1), got "
                              f"{OmegaConf.to_container(optimizer.betas)}")
        if "weight_decay" in optimizer and optimizer.weight_decay < 0:
            raise ConfigError(f"method.optimizer.weight_decay must be >= 0, got {optimizer.weight_decay}")
    scheduler = method.get("lr_scheduler")
    check_schema(scheduler, LR_SCHEDULER, "method.lr_scheduler")
    if scheduler is not None:
        _check_scheduler_name(scheduler.get("name", "constant_with_warmup"))
        if scheduler.get("warmup_steps", 0) < 0:
            raise ConfigError(f"method.lr_scheduler.warmup_steps must be >= 0, got {scheduler.warmup_steps}")
    samples = cfg.get("samples")
    check_schema(samples, SAMPLES, "samples")
    if samples is not None:
        if samples.get("every_n_steps", 0) < 0:
            raise ConfigError(f"samples.every_n_steps must be >= 0 (0: no grids), got {samples.every_n_steps}")
        positive_int(samples.get("num_inference_steps", 1), "samples.num_inference_steps")
        for name, values in (samples.get("extras") or {}).items():
            if not OmegaConf.is_list(values):
                raise ConfigError(f"samples.extras.{name} must be a list with one value per sample prompt, "
                                  f"got {values!r}")
            if len(values) != len(samples.prompts):
                raise ConfigError(f"samples.extras.{name} must hold one value per sample prompt "
                                  f"({len(samples.prompts)}), got {len(values)}")
    check_schema(cfg.get("speed"), SPEED, "speed")
    checkpoint = cfg.get("checkpoint")
    check_schema(checkpoint, CHECKPOINT, "checkpoint")
    if checkpoint is not None:
        positive_int(checkpoint.get("every_n_steps", 1), "checkpoint.every_n_steps")
        keep = checkpoint.get("keep_last", 1)
        if keep != -1:
            positive_int(keep, "checkpoint.keep_last")
        every = checkpoint.get("weights_every_n_steps", 0)
        if every != 0:
            positive_int(every, "checkpoint.weights_every_n_steps")


def _top_level(cfg: DictConfig) -> None:
    for key in cfg:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{key}: unknown top-level key (accepted: {', '.join(sorted(TOP_LEVEL))}; a group "
                              "option is chosen with group=name)")
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")


def _check_scheduler_name(name) -> None:
    from diffusers.optimization import SchedulerType

    names = [t.value for t in SchedulerType]
    if name not in names:
        raise ConfigError(f"method.lr_scheduler.name: {name!r} is not a scheduler (one of {', '.join(names)})")
