"""The reference model as a strategy (``method.reference``; docs/conventions.md#the-reference-model).

Objectives never build a reference; they ask ``with backbone.reference_unet() as unet:`` (which enters
``strategy.active()``) and get the module to call
with ``backbone.unet_forward(..., unet=unet)``. The strategy decides what that is:

=============  ================================================================================================
``base``       the policy UNet with its LoRA adapters disabled (no second UNet); the default with LoRA
``frozen_copy`` a frozen copy of the UNet in the compute dtype; the default for full fine-tuning
``snapshot``   a frozen copy of the *adapter weights only*, held as a second, never-trained LoRA adapter
               ("reference") on the same UNet; ``refresh()`` copies the live adapter into it (BalancedDPO's
               periodically refreshed reference). Memory: one more set of LoRA weights, no second UNet.
=============  ================================================================================================

Every context is exception-safe: whatever the body raises, the policy is active again afterwards.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from alignment.errors import ConfigError

REFERENCES = ("auto", "base", "frozen_copy", "snapshot")
POLICY_ADAPTER = "default"     # the name peft gives the trained adapter (and the one exported)
SNAPSHOT_ADAPTER = "reference"


class ReferenceStrategy(nn.Module):
    """A module (so that a frozen copy moves with ``.to()``) that holds the policy UNet without registering it:
    the UNet's parameters stay owned by the backbone, once."""

    name = "reference"

    def __init__(self, unet: nn.Module):
        super().__init__()
        object.__setattr__(self, "unet", unet)
        # how many times refresh() ran: saved with the checkpoint, so a resume knows the reference moved
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long))

    def checkpoint_names(self) -> list[str]:
        """State-dict names (relative to this module) a checkpoint must hold to resume with this reference: nothing
        until it has been refreshed (the initial reference is rebuilt from the base weights)."""
        return ["refreshes"] if int(self.refreshes) > 0 else []

    @contextmanager
    def active(self) -> Iterator[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def refresh(self) -> None:
        """Make the reference equal to the current policy (a no-op where the reference is fixed by design)."""
        raise ConfigError(f"method.reference={self.name} cannot be refreshed (use snapshot or frozen_copy)")


class AdaptersDisabled(ReferenceStrategy):
    """``base``: the same UNet with every LoRA adapter switched off."""

    name = "base"

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        if not getattr(self.unet, "peft_config", None):  # nothing trains the UNet (method.finetune=none)
            yield self.unet
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()


class FrozenCopy(ReferenceStrategy):
    """``frozen_copy``: a full copy of the UNet taken at the start (full fine-tuning); ``refresh`` reloads it from
    the live UNet."""

    name = "frozen_copy"

    def __init__(self, unet: nn.Module):
        super().__init__(unet)
        self.copy = copy.deepcopy(unet).requires_grad_(False).eval()

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.copy

    @torch.no_grad()
    def refresh(self) -> None:
        self.copy.load_state_dict(self.unet.state_dict())
        self.refreshes += 1

    def checkpoint_names(self) -> list[str]:
        # the initial copy is rebuilt from the base weights; once refreshed it is the policy of an earlier step
        names = super().checkpoint_names()
        if int(self.refreshes) > 0:
            names += [f"copy.{name}" for name in self.copy.state_dict()]
        return names


class AdapterSnapshot(ReferenceStrategy):
    """``snapshot``: a second LoRA adapter with the policy adapter's config, frozen, initialised to the policy's
    weights (so at step 0 the reference is the policy, which starts equal to the base because LoRA's up-projection
    starts at zero). The reference pass switches the active adapter of every LoRA layer to it and back."""

    name = "snapshot"

    def __init__(self, unet: nn.Module):
        super().__init__(unet)
        config = getattr(unet, "peft_config", {}).get(POLICY_ADAPTER)
        if config is None:
            raise ConfigError("method.reference=snapshot needs LoRA adapters (method.finetune=lora)")
        trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.add_adapter(copy.deepcopy(config), adapter_name=SNAPSHOT_ADAPTER)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._activate(POLICY_ADAPTER)
        # add_adapter/set_adapter toggle requires_grad: restore exactly what was trainable before
        for name, param in unet.named_parameters():
            param.requires_grad_(name in trainable)
        self._pairs = self._match()
        for _, snapshot in self._pairs:  # peft creates it in the base weights' dtype; the policy's LoRA is fp32
            snapshot.data = snapshot.data.to(torch.float32)
        self.refresh()
        self.refreshes.zero_()  # the initial copy is not a refresh

    def _match(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live, snapshot) parameter pairs, matched by name."""
        params = dict(self.unet.named_parameters())
        marker = f".{POLICY_ADAPTER}."
        return [(param, params[name.replace(marker, f".{SNAPSHOT_ADAPTER}.")])
                for name, param in params.items() if "lora_" in name and marker in name]

    @torch.no_grad()
    def refresh(self) -> None:
        for live, snapshot in self._pairs:
            snapshot.copy_(live)
        self.refreshes += 1

    def _activate(self, adapter: str) -> None:
        for module in self._layers:
            # peft's set_adapter also flips requires_grad; keep trainability as it is
            flags = [(p, p.requires_grad) for p in module.parameters(recurse=True)]
            module.set_adapter(adapter)
            for param, flag in flags:
                param.requires_grad_(flag)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        self._activate(SNAPSHOT_ADAPTER)
        try:
            yield self.unet
        finally:
            self._activate(POLICY_ADAPTER)


def check_reference(name: str, finetune: str) -> str:
    """The strategy ``method.reference`` resolves to for ``method.finetune`` (``auto``: ``base`` for LoRA or nothing
    trained in the UNet, ``frozen_copy`` for a full fine-tune); one-line errors for combinations that cannot work.
    Cheap: run before any model is built."""
    if name not in REFERENCES:
        raise ConfigError(f"method.reference must be one of {', '.join(REFERENCES)}, got {name!r}")
    if name == "auto":
        name = "frozen_copy" if finetune == "full" else "base"
    if name == "snapshot" and finetune != "lora":
        raise ConfigError(f"method.reference=snapshot needs method.finetune=lora (got {finetune!r})")
    if name == "base" and finetune == "full":
        raise ConfigError("method.reference=base needs LoRA adapters to disable; a full fine-tune (method.finetune="
                          "full) compares against frozen_copy")
    return name


def make_reference(name: str, unet: nn.Module, finetune: str) -> ReferenceStrategy:
    """The strategy ``method.reference`` names, built on the policy ``unet`` (see ``check_reference``)."""
    name = check_reference(name, finetune)
    if name == "base":
        return AdaptersDisabled(unet)
    if name == "snapshot":
        return AdapterSnapshot(unet)
    return FrozenCopy(unet)
