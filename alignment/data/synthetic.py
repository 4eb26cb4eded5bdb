"""Tiny synthetic preference data in the Pick-a-Pic v2 schema.

The file this module writes has the same columns as a Pick-a-Pic v2 parquet shard, so every code path that
reads real preference data can be exercised offline and in seconds:

- ``caption`` (string): e.g. ``"a red circle on a white background"``.
- ``jpg_0``, ``jpg_1`` (binary): JPEG-encoded images.
- ``label_0`` (float64): ``1.0`` when ``jpg_0`` is preferred, ``0.0`` when ``jpg_1`` is preferred, ``0.5`` for a tie.

The preferred image shows the caption's colour *and* shape; the dispreferred one gets either the colour or the
shape wrong. Which of ``jpg_0`` / ``jpg_1`` holds the preferred image is drawn at random per row.

Every random choice (captions, positions, sizes, winners, ties, corrupt bytes) is drawn first, row by row from one
seeded generator (``plan_rows``); drawing and encoding the images of any row range is then a pure function of that
plan, which is what lets :class:`SyntheticPairsBuilder` build rows in chunks, in any process, with the same bytes.

Example::

    python -m alignment.data.synthetic --out data/generated/synthetic.parquet --rows 64 --size 64 --seed 0
    python -m alignment.build synthetic builder.num_rows=1024        # the same rows, as a builder (resumable)
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from alignment.builders.base import Builder
from alignment.errors import AlignmentError, ConfigError
from alignment.files import atomic_write

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

PICKAPIC_SCHEMA = pa.schema(
    [
        pa.field("caption", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.float64()),
    ]
)

# Bytes that no image decoder accepts; used for the ``num_corrupt`` rows.
_CORRUPT_PREFIX = b"this is not an image:"


def caption_for(color: str, shape: str) -> str:
    """Returns the caption used for a ``color`` ``shape`` drawing."""
    return f"a {color} {shape} on a white background"


def shape_box(image_size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Draws ``(side, left, top)`` of a shape's bounding box: 30-70% of the side, fully inside the image."""
    side = int(rng.integers(max(2, int(0.3 * image_size)), max(3, int(0.7 * image_size)) + 1))
    left = int(rng.integers(0, image_size - side + 1))
    top = int(rng.integers(0, image_size - side + 1))
    return side, left, top


def render_shape(color: str, shape: str, image_size: int, box: tuple[int, int, int]) -> Image.Image:
    """Draws one ``shape`` in ``color`` with bounding box ``box`` (from :func:`shape_box`) on a white square."""
    side, left, top = box
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    corners = (left, top, left + side - 1, top + side - 1)
    if shape == "circle":
        draw.ellipse(corners, fill=fill)
    elif shape == "square":
        draw.rectangle(corners, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def draw_shape(color: str, shape: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws one ``shape`` in ``color`` at a random position and size on a white ``image_size`` square."""
    return render_shape(color, shape, image_size, shape_box(image_size, rng))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encodes ``image`` as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _wrong_variant(color: str, shape: str, rng: np.random.Generator) -> tuple[str, str]:
    """Returns a (colour, shape) that differs from the caption in exactly one of the two."""
    if rng.random() < 0.5:
        others = [c for c in COLORS if c != color]
        return others[int(rng.integers(len(others)))], shape
    others = [s for s in SHAPES if s != shape]
    return color, others[int(rng.integers(len(others)))]


def _check_arguments(num_rows: int, image_size: int, num_ties: int, num_corrupt: int,
                     config_key: str = "dataset.generate") -> None:
    if num_rows < 1:
        raise ConfigError(f"{config_key}.num_rows must be >= 1, got {num_rows}")
    if image_size < 8:
        raise ConfigError(f"{config_key}.image_size must be >= 8, got {image_size}")
    if num_ties < 0 or num_corrupt < 0:
        raise ConfigError(f"{config_key}.num_ties and num_corrupt must be >= 0, got {num_ties} and {num_corrupt}")
    if num_ties + num_corrupt > num_rows:
        raise ConfigError(
            f"{config_key}.num_ties + num_corrupt must be <= num_rows ({num_rows}), got {num_ties} + {num_corrupt}"
        )


@dataclass(frozen=True)
class RowPlan:
    """The random choices of one row: caption, both drawings (colour, shape, box), label, corrupt ``jpg_1`` bytes."""

    caption: str
    first: tuple[str, str, tuple[int, int, int]]
    second: tuple[str, str, tuple[int, int, int]]
    label: float
    corrupt: bytes | None


def plan_rows(num_rows: int, image_size: int, seed: int, num_ties: int, num_corrupt: int) -> list[RowPlan]:
    """Every row's random choices, drawn from ``np.random.default_rng(seed)`` in one pass, in the order the images
    were always drawn (so the rows are the same as ever); cheap: no image is drawn."""
    rng = np.random.default_rng(seed)

    # Tie rows and corrupt rows are disjoint, randomly placed sets of row indices.
    special = rng.permutation(num_rows)
    tie_rows = set(special[:num_ties].tolist())
    corrupt_rows = set(special[num_ties : num_ties + num_corrupt].tolist())

    color_names = list(COLORS)
    rows = []
    for row in range(num_rows):
        color = color_names[int(rng.integers(len(color_names)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        preferred = (color, shape, shape_box(image_size, rng))

        if row in tie_rows:
            # A tie: both images match the caption equally well.
            other = (color, shape, shape_box(image_size, rng))
            label = 0.5
            first, second = preferred, other
        else:
            wrong_color, wrong_shape = _wrong_variant(color, shape, rng)
            other = (wrong_color, wrong_shape, shape_box(image_size, rng))
            winner_is_first = bool(rng.random() < 0.5)
            label = 1.0 if winner_is_first else 0.0
            first, second = (preferred, other) if winner_is_first else (other, preferred)

        corrupt = _CORRUPT_PREFIX + rng.bytes(32) if row in corrupt_rows else None
        rows.append(RowPlan(caption_for(color, shape), first, second, label, corrupt))
    return rows


def render_rows(plans: Sequence[RowPlan], image_size: int) -> pa.Table:
    """The table rows of ``plans``: images drawn and JPEG-encoded (a corrupt row's ``jpg_1`` holds its bytes)."""
    captions, jpg_0, jpg_1, labels = [], [], [], []
    for plan in plans:
        captions.append(plan.caption)
        jpg_0.append(encode_jpeg(render_shape(*plan.first[:2], image_size, plan.first[2])))
        second = render_shape(*plan.second[:2], image_size, plan.second[2])
        jpg_1.append(plan.corrupt if plan.corrupt is not None else encode_jpeg(second))
        labels.append(plan.label)
    return pa.table({"caption": captions, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": labels}, schema=PICKAPIC_SCHEMA)


SYNTHETIC_VERSION = 1  # bump when plan_rows or render_rows make other rows, so old built files are not reused


class SyntheticPairsBuilder(Builder):
    """The synthetic pairs as a dataset builder (``python -m alignment.build synthetic``): one item per row, no
    backbone; rows are identical to :func:`build_synthetic_table` with the same arguments."""

    name = "synthetic"
    item_unit = "pair"
    chunk_size = 256
    schema = PICKAPIC_SCHEMA

    def __init__(self, num_rows: int = 64, image_size: int = 64, seed: int = 0, num_ties: int = 0,
                 num_corrupt: int = 0, config_key: str = "builder"):
        _check_arguments(num_rows, image_size, num_ties, num_corrupt, config_key)
        self.num_rows, self.image_size, self.seed = int(num_rows), int(image_size), int(seed)
        self.num_ties, self.num_corrupt = int(num_ties), int(num_corrupt)
        self._plans: list[RowPlan] | None = None

    def num_items(self) -> int:
        return self.num_rows

    def key_fields(self) -> dict:
        return {"version": SYNTHETIC_VERSION, "num_rows": self.num_rows, "image_size": self.image_size,
                "seed": self.seed, "num_ties": self.num_ties, "num_corrupt": self.num_corrupt}

    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        if self._plans is None:  # drawn once per process; every chunk is rendered from it
            self._plans = plan_rows(self.num_rows, self.image_size, self.seed, self.num_ties, self.num_corrupt)
        return render_rows([self._plans[i] for i in items], self.image_size)

    def summary(self, table: pa.Table) -> dict:
        labels = table.column("label_0").to_pylist()
        return {"ties": labels.count(0.5), "first_wins": labels.count(1.0), "corrupt": self.num_corrupt}


def build_synthetic_table(
    num_rows: int = 64, image_size: int = 64, seed: int = 0, num_ties: int = 0, num_corrupt: int = 0
) -> pa.Table:
    """Builds the synthetic preference table in memory (see :func:`make_synthetic_pairs`)."""
    _check_arguments(num_rows, image_size, num_ties, num_corrupt)
    return render_rows(plan_rows(num_rows, image_size, seed, num_ties, num_corrupt), image_size)


def make_synthetic_pairs(
    path: str | os.PathLike,
    num_rows: int = 64,
    image_size: int = 64,
    seed: int = 0,
    num_ties: int = 0,
    num_corrupt: int = 0,
) -> Path:
    """Writes a deterministic synthetic preference parquet file in the Pick-a-Pic v2 schema.

    Args:
        path: The parquet file to write; parent folders are created.
        num_rows: Number of preference pairs.
        image_size: Side of the square JPEG images, in pixels.
        seed: Seed of the numpy generator that draws captions, positions, sizes and winners; the same arguments
            always give the same table.
        num_ties: Number of rows (at random positions) with ``label_0 == 0.5``; both their images match the caption.
        num_corrupt: Number of other rows whose ``jpg_1`` holds bytes that are not an image.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    The file is written to a temporary file in the same folder and moved into place with :func:`os.replace`, so
    processes that generate the same file at the same time never see a partial file.
    """
    table = build_synthetic_table(num_rows, image_size, seed, num_ties, num_corrupt)
    return atomic_write(Path(path).expanduser(), lambda tmp: pq.write_table(table, tmp))


def ensure_synthetic_pairs(path: str | os.PathLike, **kwargs) -> Path:
    """Returns ``path``, first writing it with :func:`make_synthetic_pairs` (``**kwargs``) when it is missing."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    return make_synthetic_pairs(path, **kwargs)


def main(argv: list[str] | None = None) -> Path:
    """Command line entry point: ``python -m alignment.data.synthetic --out PATH --rows N --size S --seed K``."""
    parser = argparse.ArgumentParser(description="Write a synthetic Pick-a-Pic v2 style preference parquet file.")
    parser.add_argument("--out", required=True, help="parquet file to write")
    parser.add_argument("--rows", type=int, default=64, help="number of preference pairs (default 64)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--ties", type=int, default=0, help="number of tied rows (default 0)")
    parser.add_argument("--corrupt", type=int, default=0, help="number of rows with an unreadable jpg_1 (default 0)")
    args = parser.parse_args(argv)
    try:
        path = make_synthetic_pairs(
            args.out,
            num_rows=args.rows,
            image_size=args.size,
            seed=args.seed,
            num_ties=args.ties,
            num_corrupt=args.corrupt,
        )
    except AlignmentError as error:
        parser.exit(2, f"error: {error}\n")
    print(path)
    return path


if __name__ == "__main__":
    main()
