"""Tests of alignment.data.synthetic: schema, determinism, ties, corrupt rows, atomic writes and the CLI."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignment.data.synthetic import COLORS, ensure_synthetic_pairs, main, make_synthetic_pairs
from alignment.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _color_pixels(image: Image.Image, rgb) -> int:
    """Number of pixels within a JPEG-tolerant distance of ``rgb``."""
    array = np.asarray(image, dtype=np.int32)
    return int((np.abs(array - np.array(rgb)).sum(axis=-1) < 60).sum())


def test_schema_round_trip(tmp_path):
    path = make_synthetic_pairs(tmp_path / "pairs.parquet", num_rows=12, image_size=32, seed=3)
    assert path == tmp_path / "pairs.parquet" and path.is_file()

    table = pq.read_table(path)
    assert table.schema.names == ["caption", "jpg_0", "jpg_1", "label_0"]
    assert table.schema.field("caption").type == pa.string()
    assert table.schema.field("jpg_0").type == pa.binary()
    assert table.schema.field("jpg_1").type == pa.binary()
    assert table.schema.field("label_0").type == pa.float64()
    assert table.num_rows == 12

    labels = table.column("label_0").to_pylist()
    assert set(labels) <= {0.0, 1.0}
    assert 0 < labels.count(1.0) < 12  # the winner's side is drawn at random
    for row in table.to_pylist():
        assert row["caption"].startswith("a ") and row["caption"].endswith(" on a white background")
        for column in ("jpg_0", "jpg_1"):
            image = Image.open(io.BytesIO(row[column]))
            assert image.format == "JPEG" and image.size == (32, 32)


def test_winner_shows_the_caption_colour(tmp_path):
    path = make_synthetic_pairs(tmp_path / "pairs.parquet", num_rows=16, image_size=48, seed=1)
    for row in pq.read_table(path).to_pylist():
        color = row["caption"].split()[1]
        winner = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        # The shape covers at least 30% of the side, so a good part of the image has the caption's colour.
        assert _color_pixels(_decode(winner), COLORS[color]) > 0.03 * 48 * 48


def test_deterministic_for_a_seed(tmp_path):
    first = pq.read_table(make_synthetic_pairs(tmp_path / "a.parquet", num_rows=8, image_size=16, seed=5))
    second = pq.read_table(make_synthetic_pairs(tmp_path / "b.parquet", num_rows=8, image_size=16, seed=5))
    other = pq.read_table(make_synthetic_pairs(tmp_path / "c.parquet", num_rows=8, image_size=16, seed=6))
    assert first.equals(second)
    assert not first.equals(other)


def test_ties_and_corrupt_rows(tmp_path):
    path = make_synthetic_pairs(tmp_path / "pairs.parquet", num_rows=20, image_size=16, num_ties=3, num_corrupt=2)
    rows = pq.read_table(path).to_pylist()
    assert sum(row["label_0"] == 0.5 for row in rows) == 3

    corrupt = []
    for index, row in enumerate(rows):
        _decode(row["jpg_0"])
        try:
            _decode(row["jpg_1"])
        except OSError:
            corrupt.append(index)
    assert len(corrupt) == 2
    assert all(rows[index]["label_0"] != 0.5 for index in corrupt)  # ties and corrupt rows are disjoint


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    make_synthetic_pairs(tmp_path / "sub" / "pairs.parquet", num_rows=4, image_size=16)
    assert sorted(os.listdir(tmp_path / "sub")) == ["pairs.parquet"]


def test_ensure_only_generates_missing_files(tmp_path):
    path = tmp_path / "pairs.parquet"
    ensure_synthetic_pairs(path, num_rows=4, image_size=16)
    assert pq.read_table(path).num_rows == 4
    # An existing file is kept as is, whatever the arguments.
    ensure_synthetic_pairs(path, num_rows=9, image_size=16)
    assert pq.read_table(path).num_rows == 4


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_rows": 0}, "num_rows"),
        ({"image_size": 2}, "image_size"),
        ({"num_rows": 4, "num_ties": 3, "num_corrupt": 2}, "num_ties"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        make_synthetic_pairs(tmp_path / "pairs.parquet", **kwargs)


def test_cli_main_function(tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    main(["--out", str(out), "--rows", "6", "--size", "16", "--seed", "2"])
    assert capsys.readouterr().out.strip() == str(out)
    table = pq.read_table(out)
    assert table.num_rows == 6
    reference = make_synthetic_pairs(tmp_path / "ref.parquet", num_rows=6, image_size=16, seed=2)
    assert table.equals(pq.read_table(reference))


def test_cli_module(tmp_path):
    out = tmp_path / "module.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "alignment.data.synthetic", "--out", str(out), "--rows", "3", "--size", "16"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out).num_rows == 3

    result = subprocess.run(
        [sys.executable, "-m", "alignment.data.synthetic", "--out", str(out), "--rows", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: dataset.generate.num_rows must be >= 1, got 0"
