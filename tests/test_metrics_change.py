"""PSNR / SSIM / LPIPS change metrics (docs/evaluation.md#change-metrics): reference values, masks, LPIPS weight
layouts with random weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignment.errors import ConfigError
from alignment.metrics.change import LPIPS, change_metrics, psnr, ssim

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731

# torchvision layouts written out by hand: conv index in ``features`` -> (out, in, kernel)
ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
             17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
ALEX_CH, VGG_CH = (64, 192, 384, 256, 256), (64, 128, 256, 512, 512)


def _torchvision_alex(seed=0):
    g = GEN(seed)
    sd = {}
    for i, (o, c, k) in ALEX_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, k, k, generator=g) * math.sqrt(2.0 / (c * k * k))
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.01
    sd["classifier.1.weight"] = torch.zeros(8, 8)  # ignored (real file: 4096 x 9216)
    sd["classifier.1.bias"] = torch.zeros(8)
    return sd


def _heads(channels, seed=1):
    g = GEN(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(channels)}


@pytest.fixture(scope="module")
def alex():
    model = LPIPS("alex")
    model.load_backbone_state_dict(_torchvision_alex())
    model.load_lpips_state_dict(_heads(ALEX_CH))
    return model


# -- PSNR ---------------------------------------------------------------------------------------------------------

def test_psnr_known_values_and_mask():
    a = torch.zeros(2, 3, 16, 16)
    b = a.clone()
    b[0] += 0.1                       # MSE 0.01 -> 20 dB
    assert psnr(a, b)[0].item() == pytest.approx(20.0)
    assert psnr(a, b)[1].item() == math.inf
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    c = a.clone()
    c[:, :, :8] += 0.1                # error only inside the mask
    assert psnr(a, c, mask).tolist() == pytest.approx([20.0, 20.0])
    assert psnr(a, c, 1 - mask).tolist() == [math.inf, math.inf]
    assert psnr(a, c)[0].item() == pytest.approx(10 * math.log10(1 / 0.005))
    assert math.isnan(psnr(a, c, torch.zeros(16, 16))[0].item())  # empty region


# -- SSIM ---------------------------------------------------------------------------------------------------------

def _naive_ssim_map(x, y, size=11, sigma=1.5):
    """Window-by-window SSIM (float64 numpy, two-pass moments), valid positions only: (C, H-size+1, W-size+1)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    ch, h, wd = x.shape
    out = np.zeros((ch, h - size + 1, wd - size + 1))
    for k in range(ch):
        for i in range(h - size + 1):
            for j in range(wd - size + 1):
                px, py = x[k, i:i + size, j:j + size], y[k, i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                out[k, i, j] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return out


def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 24, 24, generator=GEN(0))
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_matches_a_naive_loop_with_and_without_mask():
    x = torch.rand(1, 3, 20, 22, generator=GEN(1))
    y = (x + 0.1 * torch.randn(x.shape, generator=GEN(2))).clamp(0, 1)
    ref = _naive_ssim_map(x[0].double().numpy(), y[0].double().numpy())
    assert ssim(x, y).item() == pytest.approx(ref.mean(), abs=1e-10)
    mask = torch.zeros(20, 22)
    mask[3:12, 4:15] = 1
    cropped = mask[5:15, 5:17].numpy().astype(bool)        # centres of the valid windows
    assert ssim(x, y, mask).item() == pytest.approx(ref[:, cropped].mean(), abs=1e-10)
    assert ssim(x, y, 1 - mask).item() == pytest.approx(ref[:, ~cropped].mean(), abs=1e-10)
    assert ssim(x, y, torch.ones(20, 22)).item() == pytest.approx(ssim(x, y).item())


def test_ssim_decreases_with_noise_and_rejects_tiny_images():
    x = torch.rand(1, 3, 32, 32, generator=GEN(3))
    n = torch.randn(x.shape, generator=GEN(4))
    values = [ssim(x, (x + s * n).clamp(0, 1)).item() for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\) and \(1, 3, 16, 12\)"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 12))


# -- LPIPS --------------------------------------------------------------------------------------------------------

def _reference_lpips(x0, x1, sd, heads):
    """LPIPS-alex written out functionally from the raw state dicts (tap after each ReLU of conv1..conv5)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        h = ((2 * x - 1) - shift) / scale
        out = []
        for i, (idx, stride, pad, pool) in enumerate([(0, 4, 2, True), (3, 1, 2, True), (6, 1, 1, False),
                                                      (8, 1, 1, False), (10, 1, 1, False)]):
            if i in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(F.conv2d(h, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], stride, pad))
            out.append(h)
        return out

    total = 0
    for l, (f0, f1) in enumerate(zip(feats(x0), feats(x1))):
        n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((n0 - n1) ** 2, heads[f"lin{l}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_matches_functional_reference(alex):
    x0 = torch.rand(2, 3, 64, 64, generator=GEN(5))
    x1 = torch.rand(2, 3, 64, 64, generator=GEN(6))
    ref = _reference_lpips(x0, x1, _torchvision_alex(), _heads(ALEX_CH))
    assert alex(x0, x1).tolist() == pytest.approx(ref.tolist(), rel=1e-5)


def test_lpips_identity_symmetry_monotonicity(alex):
    x = torch.rand(2, 3, 64, 64, generator=GEN(7))
    n = torch.randn(x.shape, generator=GEN(8))
    y = (x + 0.1 * n).clamp(0, 1)
    z = (x + 0.4 * n).clamp(0, 1)
    assert alex(x, x).abs().max().item() == 0.0
    assert alex(x, y).tolist() == pytest.approx(alex(y, x).tolist(), rel=1e-6)
    assert (alex(x, z) > alex(x, y)).all() and (alex(x, y) > 0).all()


def test_lpips_mask_inside_outside_split(alex):
    x = torch.rand(1, 3, 128, 128, generator=GEN(9))
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :32, :32] = 1
    y = (x + 0.3 * torch.randn(x.shape, generator=GEN(10)) * mask).clamp(0, 1)   # change only inside
    inside, outside = alex(x, y, mask).item(), alex(x, y, 1 - mask).item()
    assert inside > 0 and outside < 0.05 * inside  # receptive fields leak a little across the border
    assert alex(x, y, torch.ones(128, 128)).item() == pytest.approx(alex(x, y).item(), rel=1e-6)
    out = change_metrics(x, y, mask, lpips=alex)
    assert out["lpips_inside"] == pytest.approx(inside, rel=1e-6)
    assert out["lpips_outside"] == pytest.approx(outside, rel=1e-6)
    assert out["psnr_outside"] == math.inf and out["psnr_inside"] < 30
    assert out["ssim_inside"] < out["ssim_outside"] <= 1.0


def test_change_metrics_keys():
    x = torch.rand(2, 3, 16, 16, generator=GEN(11))
    y = torch.rand(2, 3, 16, 16, generator=GEN(12))
    assert list(change_metrics(x, y)) == ["psnr", "ssim"]
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:12, 4:12] = 1
    out = change_metrics(x, y, mask)
    assert list(out) == ["psnr", "psnr_inside", "psnr_outside", "ssim", "ssim_inside", "ssim_outside"]
    per_image = change_metrics(x, y, mask, reduce=False)
    assert per_image["psnr_inside"].shape == (2,)
    assert out["psnr"] == pytest.approx(per_image["psnr"].mean().item())
    with pytest.raises(ValueError, match="mask must be"):
        change_metrics(x, y, torch.ones(8, 8))


def test_state_dict_key_names():
    alex_keys = set(LPIPS("alex").state_dict())
    expected = {f"features.{i}.{p}" for i in ALEX_CONVS for p in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    assert alex_keys == expected
    vgg = LPIPS("vgg")
    expected = {f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    assert set(vgg.state_dict()) == expected
    g = GEN(13)
    sd = {}
    for i, (o, c) in VGG_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c))
        sd[f"features.{i}.bias"] = torch.zeros(o)
    vgg.load_backbone_state_dict(sd)
    vgg.load_lpips_state_dict(_heads(VGG_CH))
    x = torch.rand(1, 3, 32, 32, generator=GEN(14))
    y = (x + 0.1 * torch.randn(x.shape, generator=GEN(15))).clamp(0, 1)
    assert vgg(x, x).item() == 0.0 and vgg(x, y).item() > 0


def test_from_files_torch_and_safetensors(tmp_path, alex):
    from safetensors.torch import save_file

    torch.save(_torchvision_alex(), tmp_path / "alexnet.pth")
    save_file(_torchvision_alex(), str(tmp_path / "alexnet.safetensors"))
    torch.save(_heads(ALEX_CH), tmp_path / "alex_lpips.pth")
    x = torch.rand(1, 3, 64, 64, generator=GEN(16))
    y = torch.rand(1, 3, 64, 64, generator=GEN(17))
    for backbone in ("alexnet.pth", "alexnet.safetensors"):
        model = LPIPS.from_files(tmp_path / backbone, tmp_path / "alex_lpips.pth", net="alex")
        assert model(x, y).item() == pytest.approx(alex(x, y).item(), rel=1e-6)
    # the lpips package's full-model layout: net.slice{K}.{N}.*, lins.{l}.*, scaling_layer buffers
    full = {k.replace("features.", f"net.slice{s}."): v for k, v in _torchvision_alex().items()
            for s in [1 + sum(int(k.split(".")[1]) >= b for b in (2, 5, 8, 10))] if k.startswith("features.")}
    full |= {k.replace("lin", "lins.", 1): v for k, v in _heads(ALEX_CH).items()}
    full["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(full, tmp_path / "lpips_full.pth")
    model = LPIPS.from_files(None, tmp_path / "lpips_full.pth")
    assert model(x, y).item() == pytest.approx(alex(x, y).item(), rel=1e-6)


def test_from_files_errors_are_one_line_config_errors(tmp_path):
    torch.save(_heads(ALEX_CH), tmp_path / "heads.pth")
    with pytest.raises(ConfigError, match="not found: .*missing_alexnet.pth") as err:
        LPIPS.from_files(tmp_path / "missing_alexnet.pth", tmp_path / "heads.pth")
    assert "\n" not in str(err.value)
    bad = _torchvision_alex()
    del bad["features.8.bias"]
    bad["features.4.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"bad.pth .*missing features.8.bias; unexpected features.4.weight"):
        LPIPS.from_files(tmp_path / "bad.pth", tmp_path / "heads.pth")
    with pytest.raises(ConfigError, match="wrong tensor shapes"):
        LPIPS("vgg").load_backbone_state_dict(
            {f"features.{i}.weight": torch.zeros(1, 1, 1, 1) for i in VGG_CONVS}
            | {f"features.{i}.bias": torch.zeros(1) for i in VGG_CONVS})
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read .*garbage.pth") as err:
        LPIPS.from_files(tmp_path / "garbage.pth", tmp_path / "heads.pth")
    assert "\n" not in str(err.value)
    torch.save(_torchvision_alex(), tmp_path / "alexnet.pth")
    with pytest.raises(ConfigError, match="no LPIPS linear heads"):
        LPIPS.from_files(tmp_path / "alexnet.pth", tmp_path / "alexnet.pth")
    with pytest.raises(ConfigError, match="net must be one of"):
        LPIPS("squeeze")
