"""Tests of alignment.data.images: decoding forms and the paired transform (same crop and flip for a pair)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alignment.data.images import PairTransform, decode_image, to_tensor


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless, so pixel checks are exact
    return buffer.getvalue()


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB")


def _half_black_half_white(width: int, height: int) -> Image.Image:
    """Left half black, right half white: flipping it is visible at any crop."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, width // 2 :] = 255
    return Image.fromarray(array, "RGB")


def test_decode_image_forms(tmp_path):
    image = _random_image(10, 6)
    data = _png_bytes(image)
    file = tmp_path / "image.png"
    file.write_bytes(data)

    decoded = [
        decode_image(data),
        decode_image(bytearray(data)),
        decode_image({"bytes": data, "path": None}),
        decode_image({"bytes": None, "path": str(file)}),
        decode_image(image),
    ]
    for result in decoded:
        assert result.mode == "RGB" and result.size == (10, 6)
        assert np.array_equal(np.asarray(result), np.asarray(image))

    gray = decode_image(Image.new("L", (4, 4), 7))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("value", [b"not an image", b"", None, {"bytes": None, "path": None}, 42])
def test_decode_image_rejects_garbage(value):
    with pytest.raises((OSError, ValueError)):
        decode_image(value)


def test_to_tensor_range():
    image = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8), "RGB")
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 1)
    assert torch.allclose(tensor.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1.0]), atol=1e-6)


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (16, 16), (8, 12)])
def test_output_shape_dtype_range(size):
    transform = PairTransform(16, center_crop=False, random_flip=True)
    image = _random_image(*size)
    pixels_w, pixels_l = transform(image, image.copy(), torch.Generator().manual_seed(0))
    for pixels in (pixels_w, pixels_l):
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_same_crop_and_flip_for_both_images():
    transform = PairTransform(24, center_crop=False, random_flip=True)
    image = _random_image(50, 37, seed=1)
    negative = Image.fromarray(255 - np.asarray(image), "RGB")
    for seed in range(20):
        pixels_w, pixels_l = transform(image, image.copy(), torch.Generator().manual_seed(seed))
        assert torch.equal(pixels_w, pixels_l)
        # Different content, same geometry: the negative's output is exactly the negated output.
        pixels_w, pixels_n = transform(image, negative, torch.Generator().manual_seed(seed))
        assert torch.allclose(pixels_n, -pixels_w, atol=1e-6)


def test_random_crop_varies_with_the_generator():
    transform = PairTransform(16, center_crop=False, random_flip=False)
    image = _random_image(64, 16, seed=2)  # height already 16: only the horizontal offset varies
    outputs = {transform(image, image, torch.Generator().manual_seed(seed))[0].sum().item() for seed in range(10)}
    assert len(outputs) > 1


def test_center_crop_without_flip_is_fixed():
    transform = PairTransform(16, center_crop=True, random_flip=False)
    image = _random_image(32, 16, seed=3)
    expected = to_tensor(image.crop((8, 0, 24, 16)))
    for seed in range(5):
        pixels_w, _ = transform(image, image, torch.Generator().manual_seed(seed))
        assert torch.equal(pixels_w, expected)


def test_flip_happens_for_some_seeds_and_not_others():
    transform = PairTransform(16, center_crop=True, random_flip=True)
    image = _half_black_half_white(16, 16)
    flipped = []
    for seed in range(20):
        pixels_w, pixels_l = transform(image, image, torch.Generator().manual_seed(seed))
        left_dark = pixels_w[:, :, 0].mean() < 0
        flipped.append(not left_dark)
        assert torch.equal(pixels_w, pixels_l)
    assert any(flipped) and not all(flipped)


def test_no_flip_when_disabled():
    transform = PairTransform(16, center_crop=True, random_flip=False)
    image = _half_black_half_white(16, 16)
    for seed in range(10):
        pixels_w, _ = transform(image, image, torch.Generator().manual_seed(seed))
        assert pixels_w[:, :, 0].mean() < 0


def test_shorter_side_resized_to_resolution():
    # A 2:1 image: after resizing its shorter side to 8 it is 16x8, and the centre crop keeps its middle.
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :4] = 255  # a white band at the far left is cropped away by the centre crop
    transform = PairTransform(8, center_crop=True, random_flip=False)
    pixels_w, _ = transform(Image.fromarray(array), Image.fromarray(array), torch.Generator())
    assert pixels_w.shape == (3, 8, 8)
    assert pixels_w.max() < -0.9


def test_same_generator_seed_same_output():
    transform = PairTransform(20, center_crop=False, random_flip=True)
    image = _random_image(33, 41, seed=4)
    first = transform(image, image, torch.Generator().manual_seed(7))
    second = transform(image, image, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
