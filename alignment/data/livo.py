"""LiVO's value data: single images with a value and a label, formed into preference pairs at load time
(docs/methods.md#livo-data).

One JSON object per line (``.jsonl``), image paths relative to the file::

    {"prompt": "A photo of a doctor person", "value": "gender equality", "category": "bias",
     "image": "images/000001.png", "label": 1}

``label`` is 1 (preferred) or 0 (dispreferred). A ``.parquet`` file with the same columns is read too (what a builder
writes through the builder runner); its ``image`` holds the encoded bytes or a path relative to the file.

Pairs: rows are grouped by (prompt, value); every preferred image of a group is paired with one dispreferred image of
the same group drawn at random (seeded by ``seed`` and the group), so each preferred image appears once. Groups
without a preferred or a dispreferred image give no pair (counted in ``num_unpaired_groups``). ``fraction`` keeps a
seeded random subset of the pairs (the data-efficiency study, Fig. 3a); the subsets of smaller fractions are
contained in those of larger ones. Every pair carries its ``value`` (and any other ``extra_columns`` field of its
preferred row) as a per-sample extra.

Every bad row is a one-line ``DataError`` naming the file and line: a missing ``value`` or ``label``, a value not in
the configured set, a label other than 0/1, an image path outside the dataset folder, a missing image file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from alignment.builders.base import Builder
from alignment.config import positive_int
from alignment.data.extras import check_extra_columns
from alignment.data.images import PairTransform, decode_image
from alignment.errors import ConfigError, DataError
from alignment.objectives.livo import BIAS_VALUES, VALUES, check_values
from alignment.seeding import derive_seed

REQUIRED_FIELDS: tuple[str, ...] = ("prompt", "value", "image", "label")
SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every row of a .jsonl or .parquet file; ``where`` is "<file> line <n>" / "<file> row <n>"."""
    if path.suffix == ".jsonl":
        from alignment.data.prompts import jsonl_values

        rows = jsonl_values(path)
        for where, row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        return rows
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - the parquet reader raises many types
        raise DataError(f"dataset.source: {path} is not a readable parquet file ({type(err).__name__})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _check_row(where: str, row: dict, values: Sequence[str], folder: Path) -> tuple[str, str, Any, int]:
    """(prompt, value, image, label) of one row, checked; ``image`` is bytes or a resolved path inside ``folder``."""
    for name in REQUIRED_FIELDS:
        if row.get(name) is None:
            raise DataError(f"{where}: missing {name!r} (a LiVO row needs {', '.join(REQUIRED_FIELDS)})")
    prompt, value, label, image = row["prompt"], row["value"], row["label"], row["image"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if value not in values:
        raise DataError(f"{where}: value {value!r} is not in the configured value set ({', '.join(values)}; "
                        "dataset.values)")
    if isinstance(label, bool) or label not in (0, 1):
        raise DataError(f"{where}: 'label' must be 1 (preferred) or 0 (dispreferred), got {label!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return prompt, value, bytes(image), int(label)
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a path relative to the file, got {image!r}")
    path = (folder / image).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DataError(f"{where}: image {image!r} lies outside the dataset folder {folder}")
    if not path.is_file():
        raise DataError(f"{where}: image file {path} does not exist")
    return prompt, value, str(path), int(label)


def _resolve_source(source) -> Path:
    if source is None or source == "":
        raise ConfigError("dataset.source: set the LiVO data file (dataset.source=<file.jsonl>)")
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if len(files) != 1:
            raise DataError(f"dataset.source: folder {path} holds {len(files)} .jsonl/.parquet files; name one")
        path = files[0]
    if not path.is_file():
        raise DataError(f"dataset.source: {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise DataError(f"dataset.source: {path} is not a .jsonl or .parquet file")
    return path


class ValuePairs(Dataset):
    """Preference pairs formed from LiVO's single-image rows (see the module docstring).

    Args:
        source: The ``.jsonl`` (or ``.parquet``) file, or a folder holding exactly one.
        values: The configured value set; a row's value must be one of them.
        resolution, center_crop, random_flip: The image transform (as ``PreferencePairs``).
        fraction: Keep this share of the pairs, a seeded random subset (0 < fraction <= 1).
        seed: Seeds the pairing, the subset and the per-item augmentation.
        extra_columns: Fields carried per pair as ``batch.extras`` (``value`` for LiVO; ``category`` or any other
            field of the preferred row).
        check_images: Decode every paired image once, here, so that a bad image fails before training.
        proportion_empty_prompts: Probability of replacing an item's caption with ``""``.
        backbone: The backbone's name: the synthetic data (``SyntheticValueBuilder``) is refused for any backbone
            but tiny / toy / random.
    """

    kind = "pairs"

    def __init__(self, source: str | os.PathLike, values: Sequence[str] = VALUES, resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, fraction: float = 1.0, seed: int = 0,
                 extra_columns: Sequence[str] = ("value",), check_images: bool = True,
                 proportion_empty_prompts: float = 0.0, backbone: str | None = None):
        self.values = check_values(list(values), "dataset.values")
        positive_int(resolution, "dataset.resolution")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"dataset.fraction must be in (0, 1], got {fraction!r}")
        if not isinstance(proportion_empty_prompts, (int, float)) or not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ConfigError(f"dataset.proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts!r}")
        self.extra_columns = check_extra_columns(extra_columns)
        self.seed = int(seed)
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.transform = PairTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        path = _resolve_source(source)
        self.source = str(path)
        if path.name.startswith(SyntheticValueBuilder.name + "-") and backbone is not None \
                and backbone not in SYNTHETIC_BACKBONES:
            raise ConfigError(f"dataset.source: {path} is the synthetic LiVO data, made for backbone="
                              f"{'/'.join(SYNTHETIC_BACKBONES)}, not {backbone}; give the LiVO file the builder makes "
                              "(`python -m alignment.build livo ...`) as dataset.source=<file.jsonl>")

        rows = []
        groups: dict[tuple[str, str], list[int]] = {}
        for where, row in _read_rows(path):
            prompt, value, image, label = _check_row(where, row, self.values, path.parent)
            for column in self.extra_columns:
                if column not in row:
                    raise DataError(f"{where}: no field {column!r} (dataset.extra_columns)")
            rows.append({"where": where, "prompt": prompt, "value": value, "image": image, "label": label,
                         "extras": {c: row[c] for c in self.extra_columns}})
            groups.setdefault((prompt, value), []).append(len(rows) - 1)
        self.num_rows = len(rows)
        pairs, self.num_unpaired_groups = [], 0
        for number, members in enumerate(groups.values()):  # first-seen order of (prompt, value)
            winners = [i for i in members if rows[i]["label"] == 1]
            losers = [i for i in members if rows[i]["label"] == 0]
            if not winners or not losers:
                self.num_unpaired_groups += 1
                continue
            rng = np.random.default_rng(derive_seed(self.seed, "livo-pairs", number))
            pairs += [(w, losers[int(rng.integers(len(losers)))]) for w in winners]
        if not pairs:
            raise DataError(f"{path}: no pairs — no (prompt, value) holds both a preferred (label 1) and a "
                            f"dispreferred (label 0) image ({self.num_rows} rows)")
        self.num_all_pairs = len(pairs)
        if fraction < 1:
            keep = max(1, math.ceil(fraction * len(pairs)))
            order = np.random.default_rng(derive_seed(self.seed, "livo-fraction")).permutation(len(pairs))
            chosen = sorted(order[:keep].tolist())
            pairs = [pairs[i] for i in chosen]
        self._rows = rows
        self._pairs = pairs
        if check_images:
            for w, l in pairs:
                for i in (w, l):
                    self._decode(i)

    # ------------------------------------------------------------------------------------------------ access
    def _decode(self, i: int):
        row = self._rows[i]
        try:
            return decode_image(row["image"] if isinstance(row["image"], bytes) else {"path": row["image"]})
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError ...
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise DataError(f"{row['where']}: image is not readable ({reason})") from None

    def __len__(self) -> int:
        return len(self._pairs)

    def captions(self) -> list[str]:
        return [self._rows[w]["prompt"] for w, _ in self._pairs]

    def rows(self) -> list[int]:
        return list(range(len(self._pairs)))

    def original_index(self, index: int) -> int:
        return index

    def extras(self, index: int) -> dict[str, Any]:
        return dict(self._rows[self._pairs[index][0]]["extras"])

    def extra_values(self) -> dict[str, list]:
        return {c: [self._rows[w]["extras"][c] for w, _ in self._pairs] for c in self.extra_columns}

    def pair_lines(self, index: int) -> tuple[str, str]:
        """Where the preferred and the dispreferred row of pair ``index`` come from ("<file> line <n>")."""
        w, l = self._pairs[index]
        return self._rows[w]["where"], self._rows[l]["where"]

    def __getitem__(self, key) -> dict[str, Any]:
        from alignment.data.pickapic import augmentation_seed, resolve_key

        index, epoch = resolve_key(key, len(self), type(self).__name__)
        w, l = self._pairs[index]
        rng = torch.Generator().manual_seed(augmentation_seed(self.seed, index, epoch))
        drop_caption = torch.rand(1, generator=rng).item() < self.proportion_empty_prompts
        pixels_w, pixels_l, geometry = self.transform.with_geometry(self._decode(w), self._decode(l), rng)
        return {"pixel_values_w": pixels_w, "pixel_values_l": pixels_l,
                "caption": "" if drop_caption else self._rows[w]["prompt"], "index": index,
                "extras": self.extras(index), **geometry}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, rows={self.num_rows}, pairs={len(self)}, "
                f"values={len(self.values)})")


# ------------------------------------------------------------------------------------------------ synthetic data
SYNTHETIC_BACKBONES: tuple[str, ...] = ("tiny", "toy", "random")
LIVO_SCHEMA = pa.schema([pa.field("prompt", pa.string()), pa.field("value", pa.string()),
                         pa.field("category", pa.string()), pa.field("image", pa.binary()),
                         pa.field("label", pa.int64())])


class SyntheticValueBuilder(Builder):
    """Small LiVO-format data for the offline backbones (``backbone=tiny`` / ``toy``): per value, prompts
    "a {shape} on a white background" with ``images_per_prompt`` images, half preferred (the shape in the value's
    colour), half dispreferred (in another colour). It exercises every code path of LiVO training; it is not the
    paper's data, which ``python -m alignment.build livo`` makes from a real backbone."""

    name = "livo_synthetic"
    item_unit = "img"
    chunk_size = 64
    schema = LIVO_SCHEMA

    def __init__(self, values: Sequence[str] = VALUES, prompts_per_value: int = 2, images_per_prompt: int = 4,
                 image_size: int = 32, seed: int = 0, config_key: str = "dataset.generate"):
        self.values = check_values(list(values), f"{config_key}.values")
        self.prompts_per_value = positive_int(prompts_per_value, f"{config_key}.prompts_per_value")
        self.images_per_prompt = positive_int(images_per_prompt, f"{config_key}.images_per_prompt")
        if self.images_per_prompt < 2:
            raise ConfigError(f"{config_key}.images_per_prompt must be >= 2 (a preferred and a dispreferred image)")
        self.image_size = positive_int(image_size, f"{config_key}.image_size")
        self.seed = int(seed)

    def num_items(self) -> int:
        return len(self.values) * self.prompts_per_value * self.images_per_prompt

    def key_fields(self) -> dict:
        return {"version": 1, "values": self.values, "prompts_per_value": self.prompts_per_value,
                "images_per_prompt": self.images_per_prompt, "image_size": self.image_size, "seed": self.seed}

    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        import io

        from alignment.data.synthetic import COLORS, SHAPES, draw_shape

        colours = list(COLORS)
        rows = []
        for item in items:
            value_index, rest = divmod(item, self.prompts_per_value * self.images_per_prompt)
            prompt_index, image_index = divmod(rest, self.images_per_prompt)
            value = self.values[value_index]
            shape = SHAPES[(value_index + prompt_index) % len(SHAPES)]
            label = int(image_index % 2 == 0)
            rng = np.random.default_rng(derive_seed(self.seed, "livo-synthetic", item))
            colour = colours[(value_index + (0 if label else 3)) % len(colours)]
            buffer = io.BytesIO()
            draw_shape(colour, shape, self.image_size, rng).save(buffer, format="PNG")
            rows.append({"prompt": f"a {shape} on a white background", "value": value,
                         "category": "bias" if value in BIAS_VALUES else "toxicity", "image": buffer.getvalue(),
                         "label": label})
        return pa.Table.from_pylist(rows, schema=LIVO_SCHEMA)
