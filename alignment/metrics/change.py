"""How much fine-tuning changed an image: PSNR, SSIM and LPIPS, overall and inside / outside a mask
(docs/evaluation.md#change-metrics).

Focus-N-Fix reports these between the base model's and the tuned model's images generated from the same seeds:
high PSNR / SSIM and low LPIPS outside the mask mean the fix stayed local. All functions take images in [0, 1]
(docs/conventions.md#pixel-ranges) as (B, C, H, W) tensors and return one value per image; masks are (B, 1, H, W), (B,
H, W), (1, 1, H, W)
or (H, W), at the image resolution, 1 = inside (fractional values act as weights).

- :func:`psnr` — ``10·log10(1 / MSE)`` dB; masked: MSE over the mask's pixels only (all channels).
- :func:`ssim` — Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5), C1 = (0.01)², C2 = (0.03)², computed
  per channel on the "valid" part of the image (no padding: the map is (H−10)×(W−10), as in the authors' MATLAB
  code) and averaged over channels; masked: mean of the SSIM map over the mask (cropped like the map).
- :class:`LPIPS` — Zhang et al. 2018 in plain torch (torchvision cannot be used here): AlexNet or VGG16 feature
  stacks laid out like torchvision's ``features`` (so a torchvision state dict ``features.N.weight`` loads), the
  lpips package's input scaling and linear heads (``lin0..lin4.model.1.weight``); masked: each layer's distance
  map is averaged with the mask area-resized to that layer's resolution.

An empty region (mask all 0 for "inside", all 1 for "outside") gives NaN for that image; identical images give
PSNR = inf.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from alignment.errors import ConfigError

__all__ = ["psnr", "ssim", "ssim_map", "LPIPS", "change_metrics", "load_weights_file"]

# ---------------------------------------------------------------------------------------------------------------
# inputs


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images {name} must be a (B, C, H, W) tensor in [0, 1], got {shape}")
    if a.shape != b.shape:
        raise ValueError(f"the two image batches must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _prep_mask(mask: Optional[torch.Tensor], images: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as a (B, 1, H, W) tensor of weights in [0, 1], in the images' dtype (float64 for int images)."""
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=images.device)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    b, _, h, w = images.shape
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[2:] != (h, w) or m.shape[0] not in (1, b):
        raise ValueError(f"mask must be (B, 1, H, W), (B, H, W), (1, 1, H, W) or (H, W) at the image resolution "
                         f"{(h, w)} with B = {b}, got {tuple(torch.as_tensor(mask).shape)}")
    dtype = images.dtype if images.is_floating_point() else torch.float64
    m = m.to(dtype)
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"mask values must be in [0, 1], got [{float(m.min())}, {float(m.max())}]")
    return m.expand(b, 1, h, w)


def _weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-image mean of ``values`` (B, C, h, w) weighted by ``weights`` (B, 1, h, w); NaN where weights sum to 0."""
    if weights is None:
        return values.mean(dim=(1, 2, 3))
    num = (values * weights).sum(dim=(1, 2, 3))
    den = weights.sum(dim=(1, 2, 3)) * values.shape[1]
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.full_like(num, math.nan))


# ---------------------------------------------------------------------------------------------------------------
# PSNR and SSIM


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
         data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (docs/evaluation.md#psnr): ``10·log10(data_range² / MSE)``, shape
    (B,).

    With a mask the MSE is taken over the mask's pixels only (weighted by the mask, all channels). Identical
    images give +inf; an empty mask gives NaN.
    """
    a, b = _check_pair(a, b)
    x, y = a.double(), b.double()
    mse = _weighted_mean((x - y) ** 2, _prep_mask(mask, x))
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """The SSIM map (B, C, H − window_size + 1, W − window_size + 1), float64, no padding (docs/evaluation.md#ssim)."""
    a, b = _check_pair(a, b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got "
                         f"{tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    c = x.shape[1]
    win = _gaussian_window(window_size, sigma, c, x.dtype, x.device)
    filt = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731  (depthwise Gaussian filter, valid part)
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (docs/evaluation.md#ssim), shape (B,), float64.

    Gaussian window ``window_size`` (11), σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)² with L = ``data_range``; the map
    is computed per channel without padding and averaged over its pixels and the channels. With a mask, the map is
    averaged over the mask's pixels (the mask cropped by ``window_size // 2`` on each side, like the map, so a
    pixel's SSIM is that of the window centred on it); NaN where the cropped mask is empty.
    """
    smap = ssim_map(a, b, data_range=data_range, window_size=window_size, sigma=sigma)
    m = _prep_mask(mask, a.double())
    if m is not None:
        pad = (window_size - 1) // 2
        m = m[:, :, pad:pad + smap.shape[2], pad:pad + smap.shape[3]]
    return _weighted_mean(smap, m)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS

# torchvision ``features`` layouts: ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride)
_ALEX_LAYOUT = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
                ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
                ("conv", 192, 384, 3, 1, 1), ("relu",),
                ("conv", 384, 256, 3, 1, 1), ("relu",),
                ("conv", 256, 256, 3, 1, 1), ("relu",), ("pool", 3, 2)]


def _vgg16_layout() -> list[tuple]:
    layout, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layout.append(("pool", 2, 2))
        else:
            layout += [("conv", cin, v, 3, 1, 1), ("relu",)]
            cin = v
    return layout


# per backbone: layout, indices of the ReLU layers whose outputs LPIPS compares (the lpips package's slice ends:
# alex relu1..relu5, vgg relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), and their channel counts
_NETS = {
    "alex": (_ALEX_LAYOUT, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (_vgg16_layout(), (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}
_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}

# the lpips package's ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet statistics
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips' normalize_tensor epsilon


def _build_features(layout: list[tuple]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in layout:
        if spec[0] == "conv":
            _, cin, cout, k, s, p = spec
            layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        elif spec[0] == "relu":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(kernel_size=spec[1], stride=spec[2]))
    return nn.Sequential(*layers)


class _LinHead(nn.Module):
    """The lpips package's NetLinLayer: ``model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))``.

    Keeps that layout so the state dict key is ``model.1.weight``; the dropout is never applied (evaluation).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))
        nn.init.ones_(self.model[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[1](x)


def load_weights_file(path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a user-supplied file: ``.safetensors`` or a torch pickle read with ``weights_only=True``.

    A checkpoint that wraps its weights in ``{"state_dict": ...}`` is unwrapped. Raises ConfigError (one line,
    naming the file) when the file is missing, unreadable or not a mapping of tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"cannot read {what} file {p}: {type(err).__name__}: {first}") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{what} file {p} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _key_summary(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), plain torch (docs/evaluation.md#lpips).

    ``forward(x0, x1, mask=None)`` takes two (B, 3, H, W) batches in [0, 1] and returns (B,) distances:
    inputs scaled to [−1, 1], shifted / scaled by the lpips constants (:data:`LPIPS_SHIFT`, :data:`LPIPS_SCALE`),
    passed through the backbone; at each of the 5 compared layers the features are unit-normalised over channels,
    their squared difference is weighted by the linear head ``lin{l}`` (a 1×1 conv to one channel) and averaged
    over space (or over the mask resized to the layer's resolution); the 5 layer values are summed.

    State dict layout: ``features.N.weight/bias`` exactly as torchvision's ``alexnet()``/``vgg16()`` ``.features``,
    and ``lin0..lin4.model.1.weight`` as the lpips package (and its released ``weights/v0.1/{alex,vgg}.pth``).
    Built without files, the backbone is randomly initialised and the heads are all ones (the lpips package's
    ``lpips=False`` variant); use :meth:`from_files` for the real metric. Parameters are frozen; gradients still
    flow to the inputs.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        key = _NET_ALIASES.get(str(net).lower())
        if key is None:
            raise ConfigError(f"LPIPS net must be one of alex, vgg, got {net!r}")
        layout, taps, channels = _NETS[key]
        self.net = key
        self.taps = taps
        self.channels = channels
        self.features = _build_features(layout[:taps[-1] + 1])
        for i, c in enumerate(channels):
            setattr(self, f"lin{i}", _LinHead(c))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    # -- weights ------------------------------------------------------------------------------------------------

    @property
    def lins(self) -> list[_LinHead]:
        return [getattr(self, f"lin{i}") for i in range(len(self.channels))]

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the backbone strictly from a torchvision-format state dict (``features.N.weight/bias``).

        Also accepted: the lpips package's full-model keys ``net.slice{K}.N.*``, a ``module.`` prefix; other keys
        (``classifier.*``, ``lin*``, ``scaling_layer.*``) are ignored. Missing or unexpected ``features`` keys, or
        wrong shapes, raise ConfigError naming ``source``.
        """
        feats = {}
        for k, v in state_dict.items():
            k = _strip_module(k)
            m = re.fullmatch(r"net\.slice\d+\.(\d+\..+)", k)
            if m:
                k = "features." + m.group(1)
            if k.startswith("features."):
                feats[k[len("features."):]] = v
        if not feats:
            raise ConfigError(f"{source} holds no {self.net} backbone weights (expected keys like features.0.weight)")
        self._load_strict(self.features, feats, source, "features.")

    def load_lpips_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the linear heads strictly from an lpips-format state dict (``lin{l}.model.1.weight``, l = 0..4).

        Also accepted: ``lins.{l}.model.1.weight`` (the lpips module's ModuleList alias), ``lin{l}.model.0.weight``
        (the no-dropout variant), a ``module.`` prefix; other keys are ignored. Missing heads or wrong shapes raise
        ConfigError naming ``source``.
        """
        heads = {}
        for k, v in state_dict.items():
            k = _strip_module(k)
            m = re.fullmatch(r"(?:lin|lins\.)(\d+)\.model\.(\d+)\.(.+)", k)
            if not m:
                continue
            idx, layer, rest = m.groups()
            if layer == "0" and rest == "weight" and v.ndim == 4:
                layer = "1"  # no-dropout layout: the conv is model.0
            heads.setdefault(f"lin{idx}.model.{layer}.{rest}", v)
        if not heads:
            raise ConfigError(f"{source} holds no LPIPS linear heads (expected keys like lin0.model.1.weight)")
        target = nn.ModuleDict({f"lin{i}": lin for i, lin in enumerate(self.lins)})
        self._load_strict(target, heads, source, "")

    @staticmethod
    def _load_strict(module: nn.Module, sd: dict, source: str, prefix: str) -> None:
        expected = set(module.state_dict())
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            parts = []
            if missing:
                parts.append("missing " + _key_summary(prefix + k for k in missing))
            if unexpected:
                parts.append("unexpected " + _key_summary(prefix + k for k in unexpected))
            raise ConfigError(f"{source} does not match the LPIPS layout: " + "; ".join(parts))
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            raise ConfigError(f"{source} has wrong tensor shapes for LPIPS: "
                              + ("; ".join(shapes[:2]) or str(err).splitlines()[0])) from None

    @classmethod
    def from_files(cls, backbone_weights, lpips_weights, net: str = "alex") -> "LPIPS":
        """LPIPS with user-supplied weights (docs/evaluation.md#lpips): torchvision ``alexnet``/``vgg16`` weights and
        lpips heads.

        Args:
            backbone_weights: torchvision-format file (e.g. ``alexnet-owt-7be5be79.pth``; ``classifier.*`` ignored),
                ``.safetensors`` or a torch pickle (read with ``weights_only=True``). May be None when
                ``lpips_weights`` is a full lpips-package state dict that also holds ``net.slice*`` keys.
            lpips_weights: the lpips heads (e.g. the lpips package's ``weights/v0.1/alex.pth``).
            net: ``"alex"`` or ``"vgg"``.

        Raises:
            ConfigError: a file is missing or unreadable, or its keys / shapes do not fit (one line naming it).
        """
        model = cls(net)
        heads = load_weights_file(lpips_weights, "LPIPS head weights")
        if backbone_weights is None:
            model.load_backbone_state_dict(heads, source=f"LPIPS head weights file {lpips_weights}")
        else:
            backbone = load_weights_file(backbone_weights, f"LPIPS {model.net} backbone weights")
            model.load_backbone_state_dict(backbone, source=f"LPIPS backbone weights file {backbone_weights}")
        model.load_lpips_state_dict(heads, source=f"LPIPS head weights file {lpips_weights}")
        return model

    # -- metric -------------------------------------------------------------------------------------------------

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x * 2.0 - 1.0 - self.shift) / self.scale
        outs = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                outs.append(h)
        return outs

    def layer_maps(self, x0: torch.Tensor, x1: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer LPIPS distance maps (B, 1, h_l, w_l) before spatial averaging (5 layers)."""
        x0, x1 = _check_pair(x0, x1)
        if x0.shape[1] != 3:
            raise ValueError(f"LPIPS takes RGB images (B, 3, H, W), got {tuple(x0.shape)}")
        dtype = self.shift.dtype
        b = x0.shape[0]
        feats = self._taps(torch.cat([x0, x1]).to(dtype))  # one backbone pass for both batches
        maps = []
        for f, lin in zip(feats, self.lins):
            f = f / (torch.sqrt((f ** 2).sum(dim=1, keepdim=True)) + _EPS)
            maps.append(lin((f[:b] - f[b:]) ** 2))
        return maps

    @staticmethod
    def reduce_maps(maps: list[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over layers of the spatial mean of each map, or of its mean weighted by ``mask`` (B, 1, H, W) resized
        to the layer's resolution by area averaging; NaN where the resized mask is empty. Returns (B,)."""
        total = 0.0
        for d in maps:
            w = None if mask is None else F.adaptive_avg_pool2d(mask.to(d.dtype), d.shape[-2:])
            total = total + _weighted_mean(d, w)
        return total

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LPIPS distance per image pair, (B,); images in [0, 1]; with a mask, the distance inside it."""
        maps = self.layer_maps(x0, x1)
        return self.reduce_maps(maps, _prep_mask(mask, x0))


# ---------------------------------------------------------------------------------------------------------------
# all together


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double())) if x.numel() else math.nan


def change_metrics(base: torch.Tensor, tuned: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   lpips: Optional[LPIPS] = None, reduce: bool = True) -> dict:
    """PSNR, SSIM (and LPIPS when a module is given) between base and tuned images (docs/evaluation.md#change-metrics).

    Args:
        base, tuned: (B, 3, H, W) in [0, 1], the base and the tuned model's images from the same seeds.
        mask: optional Focus-N-Fix region mask (1 = the region the fix may change).
        lpips: an :class:`LPIPS` module; without it no LPIPS entries are returned.
        reduce: True: mean over images (NaN images — empty regions — are skipped); False: the (B,) tensors.

    Returns:
        ``{"psnr", "ssim"[, "lpips"]}`` over the whole image and, with a mask, also ``"{metric}_inside"`` and
        ``"{metric}_outside"`` (outside = weights 1 − mask).
    """
    base, tuned = _check_pair(base, tuned)
    m = _prep_mask(mask, base.double())
    regions = {"": None} if m is None else {"": None, "_inside": m, "_outside": 1.0 - m}
    out: dict = {}
    for suffix, region in regions.items():
        out[f"psnr{suffix}"] = psnr(base, tuned, region)
        out[f"ssim{suffix}"] = ssim(base, tuned, region)
    if lpips is not None:
        with torch.no_grad():
            maps = lpips.layer_maps(base, tuned)
        for suffix, region in regions.items():
            out[f"lpips{suffix}"] = lpips.reduce_maps(maps, region)
    order = [f"{k}{s}" for k in ("psnr", "ssim", "lpips") for s in regions if f"{k}{s}" in out]
    out = {k: out[k] for k in order}
    return {k: _nanmean(v) for k, v in out.items()} if reduce else out
