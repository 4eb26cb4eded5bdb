"""Image decoding and the paired training transform (PIL + torch only, no torchvision).

The transform follows the official Diffusion-DPO training script, which concatenates the preferred and the
dispreferred image along the channel axis and transforms the pair as one image: both images of a pair are
resized, cropped at the same offsets and flipped (or not) together.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image


def decode_image(value: Any) -> Image.Image:
    """Decodes one stored image into an RGB PIL image.

    Args:
        value: Raw encoded bytes (``bytes``, ``bytearray`` or ``memoryview``), a dict in the form of the Hugging
            Face ``Image`` feature (``{"bytes": ..., "path": ...}``; ``path`` is used when ``bytes`` is empty),
            or a PIL image.

    Returns:
        The fully loaded image, converted to RGB.

    Raises:
        ValueError: The value is empty or of an unsupported type.
        OSError: PIL cannot read the data (e.g. ``PIL.UnidentifiedImageError``) or the file is missing.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ValueError("empty image bytes")
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"])
        if value.get("path"):
            image = Image.open(os.fspath(value["path"]))
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    elif value is None:
        raise ValueError("image is missing (null)")
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")

    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resizes ``image`` (bilinear) so that its shorter side is ``size``, keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_width, new_height = size, max(size, int(round(height * size / width)))
    else:
        new_width, new_height = max(size, int(round(width * size / height))), size
    return image.resize((new_width, new_height), resample=Image.Resampling.BILINEAR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Converts an RGB PIL image to a float32 ``(3, H, W)`` tensor in ``[-1, 1]``."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


class PairTransform:
    """Turns a (preferred, dispreferred) pair of PIL images into two normalized training tensors.

    Each image is resized so that its shorter side equals ``resolution`` (bilinear), cropped to a
    ``resolution`` x ``resolution`` square and, with ``random_flip``, flipped horizontally with probability 0.5.
    The crop position and the flip are drawn once per pair from the given generator and applied to both images.

    Args:
        resolution: Side of the square output, in pixels.
        center_crop: Crop the centre; otherwise crop at a random position.
        random_flip: Flip both images horizontally with probability 0.5.

    Example::

        transform = PairTransform(512, center_crop=False, random_flip=True)
        pixels_w, pixels_l = transform(image_w, image_l, torch.Generator().manual_seed(0))
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = True):
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip})"
        )

    def _crop_box(self, size: tuple[int, int], u_top: float, u_left: float) -> tuple[int, int, int, int]:
        """The ``(left, top, right, bottom)`` crop box of an image of ``size`` (already resized)."""
        width, height = size
        res = self.resolution
        if self.center_crop:
            top = int(round((height - res) / 2.0))
            left = int(round((width - res) / 2.0))
        else:
            # Offsets are uniform over the valid range; for two images of the same size they are identical.
            top = min(int(u_top * (height - res + 1)), height - res)
            left = min(int(u_left * (width - res + 1)), width - res)
        return left, top, left + res, top + res

    def __call__(
        self, image_w: Image.Image, image_l: Image.Image, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transforms a pair (see :meth:`with_geometry`, which also reports the crop)."""
        pixels_w, pixels_l, _ = self.with_geometry(image_w, image_l, rng)
        return pixels_w, pixels_l

    def with_geometry(
        self, image_w: Image.Image, image_l: Image.Image, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Transforms a pair and reports SDXL's micro-conditioning geometry of the preferred image.

        Args:
            image_w: The preferred image.
            image_l: The dispreferred image.
            rng: Generator for the crop position and the flip. Three numbers are always drawn from it, whatever
                the settings, so that other draws that follow stay the same.

        Returns:
            ``(pixel_values_w, pixel_values_l, geometry)``: float32 tensors of shape ``(3, resolution, resolution)``
            in ``[-1, 1]``, and ``geometry`` with ``original_size`` ``(h, w)`` of the preferred image before
            resizing and ``crop_top_left`` ``(top, left)`` of the crop in the resized image — mirrored
            (``left = width − left − resolution``) when the pair is flipped, so it describes the visible crop.
        """
        u_top, u_left, u_flip = torch.rand(3, generator=rng).tolist()
        flip = self.random_flip and u_flip < 0.5

        outputs, geometry = [], {}
        for image in (image_w, image_l):
            if image.mode != "RGB":
                image = image.convert("RGB")
            original_size = (image.height, image.width)
            image = resize_shorter_side(image, self.resolution)
            left, top, _, _ = box = self._crop_box(image.size, u_top, u_left)
            if not geometry:  # the preferred image's geometry conditions both (they share the crop)
                left = image.width - left - self.resolution if flip else left
                geometry = {"original_size": torch.tensor(original_size), "crop_top_left": torch.tensor([top, left])}
            image = image.crop(box)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            outputs.append(to_tensor(image))
        return outputs[0], outputs[1], geometry
