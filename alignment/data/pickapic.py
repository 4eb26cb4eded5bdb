"""Preference pairs in the Pick-a-Pic v2 schema, as a map-style torch dataset.

A source holds one row per comparison with the columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded images) and
``label_0`` (``1.0``: ``jpg_0`` preferred, ``0.0``: ``jpg_1`` preferred, ``0.5``: tie). It can be

- a local parquet file,
- a local folder whose ``*.parquet`` files are read in sorted order, or
- a Hugging Face hub dataset id such as ``yuvalkirstain/pickapic_v2``.

All sources go through Hugging Face ``datasets``, which keeps the table memory-mapped on disk: images are decoded
one item at a time, never all at once.

Example::

    dataset = PreferencePairs("data/generated/synthetic.parquet", resolution=64)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_pairs)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from alignment.config import positive_int
from alignment.data.extras import check_extra_columns, collate_extras
from alignment.data.images import PairTransform, decode_image
from alignment.errors import ConfigError, DataError
from alignment.seeding import derive_seed

REQUIRED_COLUMNS: tuple[str, ...] = ("jpg_0", "jpg_1", "label_0", "caption")
IMAGE_COLUMNS: tuple[str, ...] = ("jpg_0", "jpg_1")
TIE_POLICIES: tuple[str, ...] = ("drop", "keep_first")
BAD_ROW_POLICIES: tuple[str, ...] = ("skip", "fail")
VALID_LABELS: tuple[float, ...] = (0.0, 0.5, 1.0)

# Rows read at once while checking images before training.
_SCAN_CHUNK_ROWS = 256


def augmentation_seed(seed: int, index: int, epoch: int) -> int:
    """The seed of one item's augmentation draws (crop, flip, caption dropout) in one epoch."""
    return derive_seed(int(seed), int(index), int(epoch))


def resolve_key(key, length: int, owner: str = "dataset") -> tuple[int, int]:
    """A dataset key — ``index`` or ``(index, epoch)`` as StepIndexedSampler yields — as ``(index, epoch)``."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"{owner} key must be an index or an (index, epoch) pair, got {key!r}")
        index, epoch = int(key[0]), int(key[1])
    else:
        index, epoch = int(key), 0
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} preference pairs")
    return index, epoch


def _describe_image_error(error: BaseException) -> str:
    """A short one-line reason, without the object reprs that PIL puts into its messages."""
    text = str(error).strip() or type(error).__name__
    if text.startswith("cannot identify image file"):
        return "cannot identify image file"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".parquet")


def _load_table(source: str, split: str, cache_dir: str | None):
    """Loads ``source`` as a Hugging Face ``datasets.Dataset``; raises a one-line ``DataError`` when it cannot."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(str(p) for p in path.glob("*.parquet") if p.is_file())
            if not files:
                raise DataError(f"dataset.source: folder {source} holds no .parquet files")
        else:
            files = [str(path)]
        try:
            return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        except Exception as error:  # the parquet reader raises many types
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise DataError(f"dataset.source: {source} is not a readable parquet source ({reason})") from error

    if _looks_like_path(source):
        raise DataError(f"dataset.source: {source} does not exist")

    try:
        dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise DataError(
            f"dataset.source: {source!r} is neither a local path nor a loadable dataset (split {split!r}: {reason})"
        ) from error
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"dataset.source: {source!r} split {split!r} did not load as a map-style dataset")
    return dataset


class PreferencePairs(Dataset):
    """Preference pairs (preferred image, dispreferred image, caption) for Diffusion-DPO training.

    Args:
        source: Local parquet file, local folder of parquet files, or Hugging Face hub dataset id.
        split: Split to load from a hub dataset; local sources are read whole.
        resolution: Side of the square training images.
        center_crop: Crop the centre instead of a random square.
        random_flip: Flip each pair horizontally with probability 0.5.
        ties: ``"drop"`` removes the rows with ``label_0 == 0.5``; ``"keep_first"`` keeps them with ``jpg_0`` as
            the preferred image.
        proportion_empty_prompts: Probability of replacing an item's caption with ``""``.
        bad_rows: What to do with rows whose label is not 0, 0.5 or 1 or (with ``check_images``) whose images
            cannot be decoded: ``"fail"`` raises a :class:`DataError` naming the row, ``"skip"`` drops them and
            lists their original row indices in :attr:`skipped_rows`.
        check_images: Decode both images of every kept row once, here, so that a bad row is found before
            training rather than in the middle of it.
        max_rows: Keep at most this many rows (the first ones that pass the tie filter), e.g. for quick runs.
            Rows skipped by the image check are not replaced.
        seed: Base seed of the per-item randomness (crop, flip, caption dropout).
        extra_columns: Further columns of the source to carry per item (``item["extras"]``), e.g. a vote label
            or a vector of scores; collated into ``batch["extras"]`` and handed to the objective.
        hf_cache_dir: Cache folder of Hugging Face ``datasets`` (its default, ``HF_DATASETS_CACHE``, when ``None``).
        labels: Labels that replace ``label_0``, one per source row from the first (an objective's pair labeller,
            e.g. BalancedDPO's vote): 1.0 / 0.0 / 0.5 as in ``label_0``, ``None`` to leave the row out, NaN for a
            row the labeller could not label (a bad row: ``bad_rows`` decides). Rows past the end of ``labels`` are
            left out too (``num_unlabelled`` counts them with the ``None`` rows). The source's own ties are then
            whatever the labeller made of them, and ``max_rows`` counts source rows before the labels.
        extra_values: Per-sample columns computed outside the source (a pair labeller's), one value per source
            row, carried like ``extra_columns``.

    Attributes:
        skipped_rows: Original row indices dropped as bad rows (``bad_rows="skip"``), in increasing order.
        num_ties_dropped: Number of tie rows removed by ``ties="drop"``.
        num_source_rows: Number of rows in the source.
        num_unlabelled: Rows left out because ``labels`` gives them no label.

    Items are dicts with ``pixel_values_w`` and ``pixel_values_l`` (float32 ``(3, resolution, resolution)`` in
    ``[-1, 1]``), ``caption`` (str), ``index`` (the dataset index) and ``extras`` (``{column: value}``). An item is a
    pure function of
    ``(seed, index, epoch)``: index the dataset with an ``(index, epoch)`` tuple (as
    :class:`~alignment.data.sampler.StepIndexedSampler` yields) for fresh augmentations each epoch; a plain int
    means epoch 0.
    """

    kind = "pairs"  # what an objective's batch_kind must be to train on it

    def __init__(
        self,
        source: str | os.PathLike,
        split: str = "train",
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = True,
        ties: str = "drop",
        proportion_empty_prompts: float = 0.0,
        bad_rows: str = "fail",
        check_images: bool = True,
        max_rows: int | None = None,
        seed: int = 0,
        extra_columns: Sequence[str] = (),
        hf_cache_dir: str | None = None,
        labels: Sequence[float | None] | None = None,
        extra_values: dict[str, Sequence] | None = None,
    ):
        if ties not in TIE_POLICIES:
            raise ConfigError(f"dataset.ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
        if bad_rows not in BAD_ROW_POLICIES:
            raise ConfigError(f"dataset.bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, got {bad_rows!r}")
        if not isinstance(proportion_empty_prompts, (int, float)) or not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ConfigError(f"dataset.proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts!r}")
        positive_int(resolution, "dataset.resolution")
        if max_rows is not None:
            positive_int(max_rows, "dataset.max_rows")

        self.extra_columns = check_extra_columns(extra_columns)
        self.source = os.fspath(source)
        self.split = split
        self.ties = ties
        self.bad_rows = bad_rows
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.seed = int(seed)
        self.transform = PairTransform(resolution, center_crop=center_crop, random_flip=random_flip)

        dataset = _load_table(self.source, split, hf_cache_dir)
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
        if missing:
            raise DataError(
                f"{self.source}: missing required column(s) {', '.join(repr(c) for c in missing)} "
                f"(Pick-a-Pic v2 schema needs {', '.join(REQUIRED_COLUMNS)})"
            )
        missing = [column for column in self.extra_columns if column not in dataset.column_names]
        if missing:
            raise DataError(f"dataset.extra_columns: {self.source} has no column {missing[0]!r} "
                            f"(columns: {', '.join(dataset.column_names)})")
        clash = [column for column in self.extra_columns if column in REQUIRED_COLUMNS]
        if clash:
            raise ConfigError(f"dataset.extra_columns: {clash[0]!r} is already part of every item")
        # Arrow format: rows come back as raw values (bytes or {"bytes", "path"} dicts), without feature decoding.
        self._table = dataset.select_columns(list(REQUIRED_COLUMNS)).with_format("arrow")
        extras_table = dataset.select_columns(list(self.extra_columns)).with_format("arrow") \
            if self.extra_columns else None
        self.num_source_rows = len(self._table)

        self.skipped_rows: list[int] = []
        self.num_ties_dropped = 0
        self.num_unlabelled = 0
        self._labels = list(labels) if labels is not None else None
        extra_values = dict(extra_values or {})
        clash = [column for column in extra_values if column in self.extra_columns or column in REQUIRED_COLUMNS]
        if clash:
            raise ConfigError(f"dataset.extra_columns: {clash[0]!r} is computed by the method; do not list it")
        rows, winner_first = self._filter_labels(max_rows)
        if check_images:
            rows, winner_first = self._filter_images(rows, winner_first)
        if not rows:
            unlabelled = f", {self.num_unlabelled} left out by the method's labels" if self._labels is not None else ""
            raise DataError(
                f"{self.source}: no usable rows ({self.num_source_rows} rows, {self.num_ties_dropped} ties dropped, "
                f"{len(self.skipped_rows)} bad rows skipped{unlabelled})"
            )
        self._rows = rows
        self._winner_first = winner_first

        all_captions = self._table.select_columns(["caption"])[:].column("caption").to_pylist()
        self._captions = [all_captions[row] or "" for row in rows]
        # extra columns are small per row (labels, scores, strings): read once, served from memory
        self._extras = {}
        for column in self.extra_columns:
            values = extras_table.select_columns([column])[:].column(column).to_pylist()
            self._extras[column] = [values[row] for row in rows]
        for column, values in extra_values.items():
            self._extras[column] = [values[row] for row in rows]

    # ------------------------------------------------------------------------------------------------ filtering

    def _bad_row(self, row: int, message: str) -> None:
        """Fails or records a bad row, following ``bad_rows``."""
        if self.bad_rows == "fail":
            raise DataError(f"{self.source} row {row}: {message}")
        self.skipped_rows.append(row)

    def _filter_labels(self, max_rows: int | None) -> tuple[list[int], list[bool]]:
        """Applies the tie policy and checks the labels; returns kept rows and whether jpg_0 is their winner."""
        labels = self._table.select_columns(["label_0"])[:].column("label_0").to_pylist()
        if self._labels is not None:  # a pair labeller's labels replace the source's; None: left out
            labels = [self._labels[row] if row < len(self._labels) else None for row in range(len(labels))]
        rows: list[int] = []
        winner_first: list[bool] = []
        for row, label in enumerate(labels):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if label is None and self._labels is not None:
                self.num_unlabelled += 1
                continue
            if self._labels is not None and isinstance(label, float) and math.isnan(label):
                self._bad_row(row, "the method could not label it (an image that cannot be decoded, or a label_0 "
                                   "that is not 0, 0.5 or 1)")
                continue
            try:
                label = float(label)
            except (TypeError, ValueError):
                label = None
            if label not in VALID_LABELS:
                self._bad_row(row, f"column label_0 must be 0, 0.5 or 1, got {labels[row]!r}")
                continue
            if label == 0.5 and self.ties == "drop":
                self.num_ties_dropped += 1
                continue
            rows.append(row)
            winner_first.append(label != 0.0)
        return rows, winner_first

    def _filter_images(self, rows: list[int], winner_first: list[bool]) -> tuple[list[int], list[bool]]:
        """Decodes both images of every row in ``rows``; drops (or fails on) the unreadable ones."""
        kept_rows: list[int] = []
        kept_winner_first: list[bool] = []
        position = 0
        while position < len(rows):
            # Read contiguous spans of the table to keep the scan sequential on disk.
            first_row = rows[position]
            chunk = self._table[first_row : first_row + _SCAN_CHUNK_ROWS]
            images = {column: chunk.column(column) for column in IMAGE_COLUMNS}
            while position < len(rows) and rows[position] < first_row + _SCAN_CHUNK_ROWS:
                row = rows[position]
                error = self._image_error(row, {c: images[c][row - first_row].as_py() for c in IMAGE_COLUMNS})
                if error is None:
                    kept_rows.append(row)
                    kept_winner_first.append(winner_first[position])
                else:
                    self._bad_row(row, error)
                position += 1
        return kept_rows, kept_winner_first

    @staticmethod
    def _image_error(row: int, values: dict[str, Any]) -> str | None:
        """The reason why one of ``values`` (column -> stored image) cannot be decoded, or ``None``."""
        for column, value in values.items():
            try:
                decode_image(value)
            except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ...
                return f"column {column} is not a readable image ({_describe_image_error(error)})"
        return None

    # ------------------------------------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[int]:
        """Original row numbers (in the source) of the kept rows, in dataset order."""
        return list(self._rows)

    def original_index(self, index: int) -> int:
        """Original row number (in the source) of dataset item ``index``."""
        return self._rows[index]

    def captions(self) -> list[str]:
        """Captions of the kept rows, in dataset order (without caption dropout)."""
        return list(self._captions)

    def extra_values(self) -> dict[str, list]:
        """Every extra column, one value per dataset item (what the latent cache carries beside its tensors)."""
        return {column: list(values) for column, values in self._extras.items()}

    def extras(self, index: int) -> dict[str, Any]:
        """The extra columns of dataset item ``index``."""
        return {column: values[index] for column, values in self._extras.items()}

    def _resolve_key(self, key: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
        return resolve_key(key, len(self._rows), type(self).__name__)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Returns one transformed pair; ``key`` is ``index`` or ``(index, epoch)``."""
        index, epoch = self._resolve_key(key)
        row = self._rows[index]
        record = self._table[row].to_pylist()[0]

        images = {}
        for column in IMAGE_COLUMNS:
            try:
                images[column] = decode_image(record[column])
            except Exception as error:
                raise DataError(
                    f"{self.source} row {row}: column {column} is not a readable image "
                    f"({_describe_image_error(error)})"
                ) from error
        if self._winner_first[index]:
            image_w, image_l = images["jpg_0"], images["jpg_1"]
        else:
            image_w, image_l = images["jpg_1"], images["jpg_0"]

        rng = torch.Generator().manual_seed(augmentation_seed(self.seed, index, epoch))
        drop_caption = torch.rand(1, generator=rng).item() < self.proportion_empty_prompts
        pixel_values_w, pixel_values_l, geometry = self.transform.with_geometry(image_w, image_l, rng)

        return {
            "pixel_values_w": pixel_values_w,
            "pixel_values_l": pixel_values_l,
            "caption": "" if drop_caption else self._captions[index],
            "index": index,
            "extras": self.extras(index),
            **geometry,  # original_size, crop_top_left: SDXL's micro-conditioning
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, rows={len(self)}, ties={self.ties!r}, "
            f"skipped={len(self.skipped_rows)}, {self.transform!r})"
        )


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collates :class:`PreferencePairs` items into a batch.

    Returns:
        A dict with ``pixel_values_w`` and ``pixel_values_l`` (float32 ``(N, 3, R, R)``), ``original_size`` and
        ``crop_top_left`` (int64 ``(N, 2)``, when the items carry them), ``caption`` (list of N str), ``index``
        (list of N int dataset indices) and ``extras`` (see ``alignment.data.extras``).
    """
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    batch = {
        "pixel_values_w": torch.stack([item["pixel_values_w"] for item in items]),
        "pixel_values_l": torch.stack([item["pixel_values_l"] for item in items]),
        "caption": [item["caption"] for item in items],
        "index": [int(item["index"]) for item in items],
        "extras": collate_extras(items),
    }
    for key in ("original_size", "crop_top_left"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch
