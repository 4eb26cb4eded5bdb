"""HG-DPO colour shift (docs/evaluation.md#colour-shift): HSV conversion against colorsys, plain means, relative
shift."""

import colorsys

import pytest
import torch

from alignment.metrics.color import color_shift, hsv_means, rgb_to_hsv


def test_rgb_to_hsv_matches_colorsys():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 8, 8, generator=gen)
    rgb[0, :, 0, 0] = 0.5        # grey
    rgb[0, :, 0, 1] = 0.0        # black
    rgb[0, :, 0, 2] = 1.0        # white
    rgb[0, :, 0, 3] = torch.tensor([1.0, 1.0, 0.0])   # R = G tie
    rgb[0, :, 0, 4] = torch.tensor([0.0, 0.7, 0.7])   # G = B tie
    rgb[0, :, 0, 5] = torch.tensor([0.6, 0.2, 0.6])   # R = B tie (magenta side: H near 5/6)
    rgb[0, :, 0, 6] = torch.tensor([1.0, 0.0, 1e-7])  # hue just below 1
    hsv = rgb_to_hsv(rgb)
    assert hsv.shape == rgb.shape
    assert (hsv[:, 0] >= 0).all() and (hsv[:, 0] < 1).all()
    for b in range(2):
        for i in range(8):
            for j in range(8):
                ref = colorsys.rgb_to_hsv(*rgb[b, :, i, j].double().tolist())
                got = hsv[b, :, i, j].tolist()
                if ref[0] > 1 - 1e-6 and got[0] < 1e-6:  # the same hue across the 1 -> 0 wrap
                    got[0] += 1.0
                assert got == pytest.approx(ref, abs=1e-5), (b, i, j)
    assert hsv[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 0.5])  # grey: H = S = 0


def test_rejects_minus_one_to_one_images():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rgb_to_hsv(torch.full((1, 3, 2, 2), -1.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rgb_to_hsv(torch.zeros(3, 2, 2))


def _solid(rgb, n=2, size=4):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_hsv_means_is_a_plain_pixel_mean_and_streams():
    a = _solid([0.25, 0.5, 0.25], n=1, size=4)   # H 1/3, S .5, V .5 ; 16 pixels
    b = _solid([1.0, 0.0, 0.0], n=1, size=8)     # H 0,   S 1,  V 1  ; 64 pixels
    means = hsv_means([a, b])
    assert means.tolist() == pytest.approx([(16 / 3) / 80, (8 + 64) / 80, (8 + 64) / 80])
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    assert hsv_means(x).tolist() == pytest.approx(hsv_means([x[:1], x[1:]]).tolist())


def test_color_shift_by_hand():
    target = _solid([0.25, 0.5, 0.25])   # H 1/3, S 0.5, V 0.5
    aligned = _solid([0.3, 0.6, 0.3])    # H 1/3, S 0.5, V 0.6
    shift = color_shift(aligned, target)
    assert shift == pytest.approx({"H": 0.0, "S": 0.0, "V": 20.0})
    darker = _solid([0.2, 0.2, 0.4])     # H 2/3, S 0.5, V 0.4
    assert color_shift(darker, target) == pytest.approx({"H": 100.0, "S": 0.0, "V": 20.0})
    with pytest.raises(ValueError, match="channel H"):
        color_shift(aligned, _solid([0.5, 0.5, 0.5]))  # grey target: mean hue 0
