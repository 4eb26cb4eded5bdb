"""Conditioning as a component (docs/contract.md#conditioners).

The backbone turns prompts into UNet conditioning with its frozen text encoder(s) (``backbone.encode_prompt``). A
method that changes the conditioning — LiVO prepends a value token from a trainable value encoder — owns a
``Conditioner``: it receives the prompts, the per-sample extras (e.g. ``value``) and the frozen prompt conditioning,
and returns the conditioning the UNet sees. The same conditioner object is used in training, in the sample grid,
and, exported into the run folder (``<run>/conditioner/``), by ``alignment.generate`` and ``alignment.evaluate``.

Export format: ``conditioner.json`` (``_target_`` of the class, its constructor ``config``, the ``extras`` it reads)
and ``conditioner.safetensors`` (its state dict). Loading imports the class named there, which must be a
``Conditioner`` subclass, constructs it from ``config``, calls ``setup(backbone)`` and loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alignment.errors import ConfigError
from alignment.files import atomic_write, atomic_write_text

CONDITIONER_DIR = "conditioner"
CONFIG_NAME = "conditioner.json"
WEIGHTS_NAME = "conditioner.safetensors"
FORMAT = 1


class Conditioner(nn.Module):
    """Prompts (+ extras) -> UNet conditioning. Subclasses pass their constructor arguments to
    ``super().__init__(**config)`` (so the export can rebuild them) and implement ``forward``."""

    #: names of the per-sample extras it reads (checked against ``dataset.extra_columns``)
    extras: tuple[str, ...] = ()

    def __init__(self, **config: Any):
        super().__init__()
        self.config = dict(config)

    def setup(self, backbone) -> None:
        """Build what depends on the backbone (e.g. a copy of its text encoder); called once before use."""

    def forward(self, backbone, prompts: Sequence[str], extras: dict[str, Any],
                prompt_cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """``extras`` maps each name of ``self.extras`` to one value per prompt; a value may be None (a prompt file
        row or a sample-grid prompt without that field) and must then mean "no extra input"."""
        raise NotImplementedError

    def negative(self, backbone, negative_cond: dict[str, torch.Tensor],
                 extras: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The unconditional branch of classifier-free guidance; by default the backbone's own."""
        return negative_cond

    # ------------------------------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``conditioner.json`` and ``conditioner.safetensors`` (``state_dict``: e.g. a full state gathered
        from a sharded model; default this module's own)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        cls = type(self)
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_text(json.dumps({"format": FORMAT, "_target_": f"{cls.__module__}.{cls.__qualname__}",
                                      "config": self.config, "extras": list(self.extras)}, indent=1),
                          folder / CONFIG_NAME)
        return folder


def read_config(folder: Path, key: str) -> dict:
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.is_file():
        raise ConfigError(f"{key}: {config_file} does not exist")
    try:
        spec = json.loads(config_file.read_text())
        spec["_target_"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: {config_file} is not a conditioner config ({err})") from None
    return spec


def exported_extras(folder: str | Path, key: str = "conditioner") -> tuple[str, ...]:
    """The extras an exported conditioner reads (from its config, without building it)."""
    return tuple(read_config(Path(folder), key).get("extras") or ())


def load_conditioner(folder: str | Path, backbone, key: str = "conditioner") -> Conditioner:
    """Rebuild an exported conditioner onto ``backbone``; one-line errors naming ``key`` and the file."""
    from hydra.utils import get_object
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    spec = read_config(folder, key)
    target = spec["_target_"]
    if not weights_file.is_file():
        raise ConfigError(f"{key}: {weights_file} does not exist")
    try:
        cls = get_object(target)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{key}: {config_file} names {target!r}, which cannot be imported") from err
    if not (isinstance(cls, type) and issubclass(cls, Conditioner)):
        raise ConfigError(f"{key}: {config_file} names {target!r}, which is not an alignment Conditioner")
    try:
        conditioner = cls(**spec.get("config", {}))
    except TypeError as err:  # a config written by another version of the class
        raise ConfigError(f"{key}: {config_file} does not fit {target} ({err})") from None
    conditioner.setup(backbone)
    try:
        conditioner.load_state_dict(load_file(str(weights_file)))
    except RuntimeError as err:
        raise ConfigError(f"{key}: {weights_file} does not fit {target} on this backbone "
                          f"({str(err).splitlines()[0]})") from None
    return conditioner.to(backbone.device).requires_grad_(False).eval()


def condition(backbone, prompts: Sequence[str], extras: dict[str, Any] | None = None,
              conditioner: Conditioner | None = None,
              prompt_cond: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet conditioning of ``prompts``: the frozen text encoder's (``prompt_cond``, computed when not given,
    e.g. from the latent cache), passed through ``conditioner`` when there is one."""
    if prompt_cond is None:
        prompt_cond = backbone.encode_prompt(list(prompts))
    if conditioner is None:
        return prompt_cond
    return _in_unet_dtype(backbone, conditioner(backbone, list(prompts), dict(extras or {}), prompt_cond))


def negative_condition(backbone, batch_size: int, negative_prompt: str = "",
                       conditioner: Conditioner | None = None,
                       extras: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The unconditional (negative-prompt) branch of classifier-free guidance, through ``conditioner``."""
    negative = backbone.negative_conditioning(batch_size, negative_prompt)
    if conditioner is None:
        return negative
    return _in_unet_dtype(backbone, conditioner.negative(backbone, negative, dict(extras or {})))


def _in_unet_dtype(backbone, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A conditioner's trainable parts may compute in fp32 beside a bf16 UNet; sampling runs without autocast, so
    its floating outputs are cast to the UNet's dtype (a differentiable cast: training gradients still flow)."""
    dtype = backbone.unet.dtype
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in cond.items()}
