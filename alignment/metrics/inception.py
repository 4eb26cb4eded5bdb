"""Inception-v3 in plain torch, for FID and the Inception Score (no torchvision, nothing downloaded).

Two variants share one set of module names, so that the public weight files load with ``strict=True``:

- ``"fid"``: the TensorFlow ``inception-2015-12-05`` graph as ported by pytorch-fid
  (``pt_inception-2015-12-05-6726825d.pth``): 1008 logits, no ``AuxLogits``. It differs from torchvision's network in
  its pooling branches: the 3×3 average pools of ``Mixed_5b..5d``, ``Mixed_6b..6e`` and ``Mixed_7b`` do not count the
  zero padding (``count_include_pad=False``, TensorFlow's convention) and ``Mixed_7c`` uses a 3×3 *max* pool in its
  pool branch. These are the weights of the reference FID and of the original Inception Score.
- ``"torchvision"``: torchvision's ``inception_v3`` (``inception_v3_google-0cc3c7bd.pth``): 1000 ImageNet classes,
  with the ``AuxLogits`` head (present in that file; never used by :meth:`InceptionV3.forward`).

Input: images ``(B, 3, H, W)`` with values in [0, 1] (the project's metric convention). They are resized to 299×299
bilinearly (``align_corners=False``, like pytorch-fid; differentiable) and scaled to [−1, 1]. That scaling is right
for *both* variants: the torchvision weights were ported from TensorFlow too, and torchvision builds them with
``transform_input=True``, which turns its ImageNet mean/std normalised input ``(x − m)/s`` back into
``(x − m)/s · s/0.5 + (m − 0.5)/0.5 = 2x − 1``.

The output is an :class:`InceptionOutput`: the 2048-d ``pool_3`` features (what FID uses) and the logits.
For the FID variant the logits are by default ``features @ fc.weight.T`` *without* the bias, which is what the
original Inception Score code (openai/improved-gan, ``softmax/logits/MatMul``), torch-fidelity and torchmetrics
(``logits_unbiased``) use; pass ``unbiased_logits=False`` for the full ``fc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignment.errors import ConfigError

__all__ = ["InceptionOutput", "InceptionV3", "load_weight_file", "VARIANTS", "FID_CLASSES", "IMAGENET_CLASSES"]

VARIANTS = ("fid", "torchvision")
FID_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes + background + 7 unused
IMAGENET_CLASSES = 1000
INPUT_SIZE = 299
FEATURE_DIM = 2048


class InceptionOutput(NamedTuple):
    """What :class:`InceptionV3` returns: ``features`` (B, 2048) and ``logits`` (B, num_classes)."""

    features: Tensor
    logits: Tensor


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, the TF value), ReLU. Keys: ``conv.weight``, ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: Tensor, kind: str) -> Tensor:
    """The stride-1, padding-1 3×3 pool of a pool branch: ``avg`` (torchvision), ``avg_tf`` (padding not counted) or
    ``max`` (FID ``Mixed_7c``)."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=(kind == "avg"))


class InceptionA(nn.Module):
    """35×35 block (``Mixed_5b/5c/5d``): 1×1, 5×5, double 3×3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (``Mixed_6a``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (``Mixed_6b..6e``)."""

    def __init__(self, in_channels: int, channels_7x7: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (``Mixed_7a``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8×8 block with expanded 1×3 / 3×1 branches (``Mixed_7b``, ``Mixed_7c``)."""

    def __init__(self, in_channels: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionAux(nn.Module):
    """torchvision's auxiliary classifier on ``Mixed_6e``; kept so its weight file loads strictly, never run."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = BasicConv2d(in_channels, 128, 1)
        self.conv1 = BasicConv2d(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, kernel_size=5, stride=3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionV3(nn.Module):
    """Inception-v3 returning ``InceptionOutput(features (B, 2048), logits (B, num_classes))`` for images in [0, 1].

    Args:
        variant: ``"fid"`` (pytorch-fid / TF FID network) or ``"torchvision"`` (torchvision ``inception_v3``).
        num_classes: size of ``fc``; default 1008 for ``"fid"``, 1000 for ``"torchvision"``.
        aux_logits: build the ``AuxLogits`` head (only so a file holding it loads strictly); default False for
            ``"fid"``, True for ``"torchvision"`` (the official torchvision file holds it).
        resize: side the input is bilinearly resized to (299); ``None`` keeps the input size (≥ 75 px).
        unbiased_logits: return ``features @ fc.weight.T`` without ``fc.bias``; default True for ``"fid"`` (the
            original Inception Score convention), False for ``"torchvision"``.

    The model is built in eval mode with frozen parameters (it is a metric network); gradients still flow to the
    input images.
    """

    def __init__(self, variant: str = "fid", num_classes: int | None = None, aux_logits: bool | None = None,
                 resize: int | None = INPUT_SIZE, unbiased_logits: bool | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"inception variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        fid = variant == "fid"
        self.variant = variant
        self.num_classes = int(num_classes if num_classes is not None else (FID_CLASSES if fid else IMAGENET_CLASSES))
        self.resize = resize
        self.unbiased_logits = fid if unbiased_logits is None else bool(unbiased_logits)
        aux_logits = (not fid) if aux_logits is None else bool(aux_logits)
        pool_ac = "avg_tf" if fid else "avg"  # pool branch of the A, C and first E blocks
        pool_e2 = "max" if fid else "avg"  # pool branch of Mixed_7c

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, 32, pool_ac)
        self.Mixed_5c = InceptionA(256, 64, pool_ac)
        self.Mixed_5d = InceptionA(288, 64, pool_ac)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, pool_ac)
        self.Mixed_6c = InceptionC(768, 160, pool_ac)
        self.Mixed_6d = InceptionC(768, 160, pool_ac)
        self.Mixed_6e = InceptionC(768, 192, pool_ac)
        self.AuxLogits = InceptionAux(768, self.num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool_ac)
        self.Mixed_7c = InceptionE(2048, pool_e2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(FEATURE_DIM, self.num_classes)
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ forward
    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] images (B, 3, H, W) → resized, [−1, 1] network input in the parameters' dtype."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionV3 expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = images.to(self.fc.weight.dtype)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward_features(self, x: Tensor) -> Tensor:
        """Network input (already preprocessed) → 2048-d ``pool_3`` features."""
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
                      self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)

    def logits_from_features(self, features: Tensor) -> Tensor:
        """``fc`` applied to the features (without its bias when ``unbiased_logits``)."""
        return F.linear(features, self.fc.weight, None if self.unbiased_logits else self.fc.bias)

    def forward(self, images: Tensor) -> InceptionOutput:
        features = self.forward_features(self.preprocess(images))
        return InceptionOutput(features, self.logits_from_features(features))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path, variant: str | None = None, *, key: str = "metrics.inception_weights",
                  **kwargs) -> "InceptionV3":
        """Build the network from a local ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or
        ``.safetensors`` state dict and load it strictly.

        ``variant`` None infers it from the file: 1008 classes → ``"fid"``, otherwise ``"torchvision"``. The class
        count and the presence of ``AuxLogits`` are always taken from the file. Any problem (missing or unreadable
        file, keys or shapes that do not match) raises a one-line :class:`ConfigError` starting with ``key``.
        """
        state = load_weight_file(path, key=key)
        fc = state.get("fc.weight")
        if fc is None or fc.ndim != 2:
            raise ConfigError(f"{key}: {path} is not an Inception-v3 state dict (no 2-d 'fc.weight')")
        num_classes = int(fc.shape[0])
        if variant is None:
            variant = "fid" if num_classes == FID_CLASSES else "torchvision"
        aux = any(k.startswith("AuxLogits.") for k in state)
        model = cls(variant=variant, num_classes=num_classes, aux_logits=aux, **kwargs)
        model.load_checked(state, source=f"{key}: {path}")
        return model

    def load_checked(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """``load_state_dict(strict=True)`` with a one-line :class:`ConfigError` naming ``source`` on mismatch.
        ``num_batches_tracked`` may be absent (files saved before torch 0.4 lack it)."""
        own = self.state_dict()
        needed = {k for k in own if not k.endswith("num_batches_tracked")}
        missing = sorted(needed - state.keys())
        unexpected = sorted(k for k in state.keys() - own.keys())
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
            raise ConfigError(f"{source} does not match the {self.variant} Inception-v3: {'; '.join(parts)}")
        bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise ConfigError(f"{source} does not match the {self.variant} Inception-v3: {len(bad)} tensors of the "
                              f"wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        state = dict(state)
        for k in own.keys() - state.keys():  # only num_batches_tracked can be left
            state[k] = own[k]
        self.load_state_dict(state, strict=True)


def load_weight_file(path: str | Path, key: str = "metrics.inception_weights") -> dict[str, Tensor]:
    """Read a local state dict (``.safetensors`` or a torch pickle with ``weights_only=True``) onto the CPU.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix. Errors are one-line
    :class:`ConfigError` messages starting with ``key``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist" if not path.exists() else f"{key}: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad user file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{key}: cannot read {path} ({type(exc).__name__}: {reason[:200]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)
