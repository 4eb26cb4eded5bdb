"""Every scorer's raw score of both images of every preference pair, computed once and cached beside the data.

BalancedDPO labels pairs by a majority vote of several scorers (docs/methods.md#labels-by-majority-vote); its
ablations (one scorer, a random scorer per step, weighted or normalised sums, the loss sum) are all functions of
the same raw scores. Scoring is the expensive part (four CLIP-sized models on two images per pair), so this
builder does it once, for every scorer of the ensemble, and the labels are computed from the cached scores when a
run starts (milliseconds). A second run with the same data and the same scorer weights scores nothing; other
weights give another key and therefore another file — a cache is never reused for scorers it was not made by.

Output ``<out>/pair_scores-<key>.parquet``, one row per source row (in source order)::

    row      int64     the source row
    label_0  float64   the dataset's own label (1 / 0 / 0.5), for the flip statistics and tie_policy=dataset_label
    <name>_0 float64   raw score of jpg_0 by scorer <name> (NaN: the image could not be decoded)
    <name>_1 float64   raw score of jpg_1

Raw means the scorer's own output (CLIP as a cosine, no clamp, no ×100): a vote compares raw scores, and a clamp
would turn real differences into exact ties (docs/scorers.md). The key covers the source (path, size and mtime of
its files, or the hub id and split), the rows scored, the scorer names and — added by the runner — every scorer's
weights. ``python -m alignment.build pair_scores builder.source=<pairs> scorers=balanced`` builds it ahead of
training (sharded over processes like any builder); training builds it on first use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from alignment.builders.base import Builder
from alignment.config import positive_int
from alignment.errors import ConfigError, DataError

PAIR_SCORES_VERSION = 1


def score_columns(name: str) -> tuple[str, str]:
    """The two columns holding scorer ``name``'s raw scores of ``jpg_0`` and ``jpg_1``."""
    return f"{name}_0", f"{name}_1"


def default_out(source: str) -> Path:
    """Where the scores of ``source`` are cached: beside the data (the folder of a parquet file, the folder of
    parquet files itself); for a hub dataset, ``$ALIGNMENT_DATA_DIR/pair_scores`` (default data/generated)."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    return Path(os.environ.get("ALIGNMENT_DATA_DIR", "data/generated")) / "pair_scores"


class PairScores(Builder):
    """Raw scores of both images of every pair of a Pick-a-Pic-schema source, by every scorer named.

    Args:
        source: The pairs (a parquet file, a folder of parquet files, or a hub dataset id), as ``dataset.source``.
        scorers: Names of the scorers (from the ``scorers`` config) to score with; the column order follows it.
        split: The hub split (ignored for local files).
        max_rows: Score only the first ``max_rows`` source rows (quick runs); ``None``: all.
        batch_size: Images per scorer call (images of one size share a call; Pick-a-Pic mixes sizes).
    """

    name = "pair_scores"
    item_unit = "pair"
    chunk_size = 256
    needs_backbone = False

    def __init__(self, source: str, scorers: Sequence[str], split: str = "train", max_rows: int | None = None,
                 batch_size: int = 32, hf_cache_dir: str | None = None, config_key: str = "builder"):
        from alignment.data.pickapic import REQUIRED_COLUMNS, _load_table

        if not scorers:
            raise ConfigError(f"{config_key}.scorers: name at least one scorer to score the pairs with")
        self.scorer_names = tuple(str(name) for name in scorers)
        if len(set(self.scorer_names)) != len(self.scorer_names):
            raise ConfigError(f"{config_key}.scorers: a scorer is named twice ({', '.join(self.scorer_names)})")
        if max_rows is not None:
            positive_int(max_rows, f"{config_key}.max_rows")
        self.batch_size = positive_int(batch_size, f"{config_key}.batch_size")
        self.source, self.split, self.config_key = str(source), str(split), config_key
        dataset = _load_table(self.source, self.split, hf_cache_dir)
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ConfigError(f"{config_key}.source: {self.source} has no column {missing[0]!r} (Pick-a-Pic schema: "
                              f"{', '.join(REQUIRED_COLUMNS)})")
        self._table = dataset.select_columns(list(REQUIRED_COLUMNS)).with_format("arrow")
        self.count = len(self._table) if max_rows is None else min(len(self._table), int(max_rows))
        self.schema = pa.schema([pa.field("row", pa.int64()), pa.field("label_0", pa.float64())]
                                + [pa.field(column, pa.float64())
                                   for name in self.scorer_names for column in score_columns(name)])

    def num_items(self) -> int:
        return self.count

    def key_fields(self) -> dict:
        from alignment.data.cache import source_fingerprint

        return {"version": PAIR_SCORES_VERSION, "source": source_fingerprint(self.source, self.split),
                "rows": self.count, "scorers": list(self.scorer_names)}

    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        from alignment.data.images import decode_image
        from alignment.scorers.base import images_to_tensor

        start, stop = items[0], items[-1] + 1
        chunk = self._table[start:stop]
        captions = [c or "" for c in chunk.column("caption").to_pylist()]
        labels = chunk.column("label_0").to_pylist()
        # decode every image once; group equal sizes so that one scorer call sees one tensor
        images, groups = {}, {}
        for column_index, column in enumerate(("jpg_0", "jpg_1")):
            for offset, value in enumerate(chunk.column(column).to_pylist()):
                try:
                    image = decode_image(value).convert("RGB")
                except Exception:  # an unreadable image scores NaN; the dataset decides what a bad row means
                    continue
                images[(offset, column_index)] = image
                groups.setdefault(image.size, []).append((offset, column_index))
        scores = {name: [[math.nan, math.nan] for _ in captions] for name in self.scorer_names}
        for keys in groups.values():
            for begin in range(0, len(keys), self.batch_size):
                batch = keys[begin:begin + self.batch_size]
                pixels = images_to_tensor([images[k] for k in batch])
                prompts = [captions[offset] for offset, _ in batch]
                for name in self.scorer_names:
                    scorer = scorers[name]
                    try:
                        with torch.no_grad():
                            values = scorer(pixels.to(scorer.device, scorer.dtype), prompts).double().cpu().tolist()
                    except (ValueError, RuntimeError) as err:  # e.g. a caption the scorer cannot read
                        reason = " ".join(str(err).split())[:200] or type(err).__name__
                        raise DataError(f"{self.source} rows {start}-{stop - 1}: scorer {name!r} cannot score "
                                        f"them ({reason})") from None
                    for (offset, column_index), value in zip(batch, values):
                        scores[name][offset][column_index] = value
        rows = []
        for offset in range(len(captions)):
            label = labels[offset]
            row = {"row": start + offset, "label_0": float(label) if label is not None else math.nan}
            for name in self.scorer_names:
                first, second = score_columns(name)
                row[first], row[second] = scores[name][offset]
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def summary(self, table: pa.Table) -> dict:
        import numpy as np

        out = {"source": self.source, "scorers": list(self.scorer_names)}
        for name in self.scorer_names:
            first, second = score_columns(name)
            s0 = np.asarray(table.column(first).to_pylist(), dtype=float)
            s1 = np.asarray(table.column(second).to_pylist(), dtype=float)
            out[name] = {"mean": float(np.nanmean(np.concatenate([s0, s1]))) if len(s0) else math.nan,
                         "exact_ties": int((s0 == s1).sum()), "unscored": int((np.isnan(s0) | np.isnan(s1)).sum())}
        return out
