"""Tests of alignment.data.pickapic.PreferencePairs on synthetic Pick-a-Pic v2 style files (offline)."""

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from alignment.data.images import to_tensor
from alignment.data.pickapic import PreferencePairs, collate_pairs
from alignment.data.sampler import StepIndexedSampler
from alignment.data.synthetic import make_synthetic_pairs
from alignment.errors import ConfigError, DataError

SIZE = 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def tie_file(tmp_path_factory):
    """24 rows, 4 of them ties."""
    return make_synthetic_pairs(tmp_path_factory.mktemp("ties") / "pairs.parquet", 24, SIZE, seed=0, num_ties=4)


@pytest.fixture(scope="module")
def corrupt_file(tmp_path_factory):
    """20 rows, 3 of them with an unreadable jpg_1."""
    return make_synthetic_pairs(tmp_path_factory.mktemp("corrupt") / "pairs.parquet", 20, SIZE, seed=1, num_corrupt=3)


def _pairs(source, cache_dir, **kwargs):
    kwargs.setdefault("resolution", SIZE)
    return PreferencePairs(str(source), hf_cache_dir=cache_dir, **kwargs)


def _corrupt_rows(path):
    rows = []
    for index, data in enumerate(pq.read_table(path).column("jpg_1").to_pylist()):
        try:
            Image.open(io.BytesIO(data)).load()
        except OSError:
            rows.append(index)
    return rows


def _image_tensor(data: bytes) -> torch.Tensor:
    return to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def test_winner_and_loser_follow_label_0(tie_file, cache_dir):
    dataset = _pairs(tie_file, cache_dir, center_crop=True, random_flip=False, ties="keep_first")
    source_rows = pq.read_table(tie_file).to_pylist()
    seen_labels = set()
    for index in range(len(dataset)):
        item = dataset[index]
        row = source_rows[dataset.original_index(index)]
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] in (1.0, 0.5) else ("jpg_1", "jpg_0")
        assert torch.equal(item["pixel_values_w"], _image_tensor(row[winner]))
        assert torch.equal(item["pixel_values_l"], _image_tensor(row[loser]))
        assert item["caption"] == row["caption"]
        assert item["index"] == index
        seen_labels.add(row["label_0"])
    assert seen_labels == {0.0, 0.5, 1.0}


def test_item_format(tie_file, cache_dir):
    item = _pairs(tie_file, cache_dir)[(3, 1)]
    assert set(item) == {"pixel_values_w", "pixel_values_l", "caption", "index", "extras", "original_size",
                         "crop_top_left"}
    assert item["extras"] == {}  # no dataset.extra_columns
    assert item["original_size"].tolist() == [32, 32]  # this fixture writes 32 px squares
    for key in ("pixel_values_w", "pixel_values_l"):
        assert item[key].shape == (3, SIZE, SIZE) and item[key].dtype == torch.float32
        assert -1.0 <= item[key].min() and item[key].max() <= 1.0
    assert isinstance(item["caption"], str) and item["index"] == 3


def test_geometry_reports_the_crop_and_mirrors_it_when_flipped():
    from PIL import Image

    from alignment.data.images import PairTransform

    wide = Image.new("RGB", (200, 100))  # resized to 64x128: the crop's left edge is drawn from [0, 64]
    transform = PairTransform(64, center_crop=False, random_flip=True)
    seen_flip = seen_plain = False
    for seed in range(20):
        rng = torch.Generator().manual_seed(seed)
        u_top, u_left, u_flip = torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
        _, _, geometry = transform.with_geometry(wide, wide, rng)
        left = min(int(u_left * 65), 64)
        assert geometry["original_size"].tolist() == [100, 200]
        expected = 128 - left - 64 if u_flip < 0.5 else left
        assert geometry["crop_top_left"].tolist() == [0, expected]
        seen_flip |= u_flip < 0.5
        seen_plain |= u_flip >= 0.5
    assert seen_flip and seen_plain


def test_ties_drop_and_keep_first(tie_file, cache_dir):
    labels = pq.read_table(tie_file).column("label_0").to_pylist()
    dropped = _pairs(tie_file, cache_dir, ties="drop")
    kept = _pairs(tie_file, cache_dir, ties="keep_first")
    assert len(dropped) == 20 and dropped.num_ties_dropped == 4
    assert len(kept) == 24 and kept.num_ties_dropped == 0
    assert dropped.rows() == [i for i, label in enumerate(labels) if label != 0.5]
    assert kept.rows() == list(range(24))
    assert dropped.captions() == [pq.read_table(tie_file).column("caption")[i].as_py() for i in dropped.rows()]


def test_max_rows(tie_file, cache_dir):
    dataset = _pairs(tie_file, cache_dir, max_rows=5)
    assert len(dataset) == 5
    labels = pq.read_table(tie_file).column("label_0").to_pylist()
    assert all(labels[row] != 0.5 for row in dataset.rows())


def test_missing_file(tmp_path, cache_dir):
    missing = tmp_path / "nope" / "pairs.parquet"
    with pytest.raises(DataError, match=f"dataset.source: {missing} does not exist"):
        _pairs(missing, cache_dir)
    with pytest.raises(DataError, match="./relative/missing does not exist"):
        _pairs("./relative/missing", cache_dir)


def test_folder_without_parquet(tmp_path, cache_dir):
    with pytest.raises(DataError, match=f"{tmp_path} holds no .parquet files"):
        _pairs(tmp_path, cache_dir)


def test_unloadable_hub_id(cache_dir):
    with pytest.raises(DataError, match="'nobody/no-such-dataset' is neither a local path nor a loadable dataset"):
        _pairs("nobody/no-such-dataset", cache_dir)


def test_missing_columns(tmp_path, cache_dir):
    path = tmp_path / "no_label.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"]}), path)
    with pytest.raises(DataError) as error:
        _pairs(path, cache_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: missing required column(s) 'label_0'")
    assert "jpg_0, jpg_1, label_0, caption" in message


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"ties": "prefer_second"}, "dataset.ties"),
        ({"bad_rows": "ignore"}, "dataset.bad_rows"),
        ({"proportion_empty_prompts": 1.5}, "dataset.proportion_empty_prompts"),
        ({"proportion_empty_prompts": -0.1}, "dataset.proportion_empty_prompts"),
        ({"resolution": 0}, "dataset.resolution"),
        ({"max_rows": 0}, "dataset.max_rows"),
    ],
)
def test_bad_config_values(tie_file, cache_dir, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        _pairs(tie_file, cache_dir, **kwargs)


def test_corrupt_rows_fail(corrupt_file, cache_dir):
    first_bad = _corrupt_rows(corrupt_file)[0]
    with pytest.raises(DataError) as error:
        _pairs(corrupt_file, cache_dir, bad_rows="fail")
    assert str(error.value) == (
        f"{corrupt_file} row {first_bad}: column jpg_1 is not a readable image (cannot identify image file)"
    )


def test_corrupt_rows_skip(corrupt_file, cache_dir):
    bad = _corrupt_rows(corrupt_file)
    assert len(bad) == 3
    dataset = _pairs(corrupt_file, cache_dir, bad_rows="skip")
    assert dataset.skipped_rows == bad
    assert len(dataset) == 17
    assert not set(dataset.rows()) & set(bad)
    for index in range(len(dataset)):
        dataset[index]  # every kept item decodes


def test_corrupt_row_found_at_getitem_without_check(corrupt_file, cache_dir):
    dataset = _pairs(corrupt_file, cache_dir, check_images=False)
    assert len(dataset) == 20 and dataset.skipped_rows == []
    bad = _corrupt_rows(corrupt_file)[0]
    with pytest.raises(DataError, match=f"row {bad}: column jpg_1 is not a readable image"):
        dataset[dataset.rows().index(bad)]


def test_bad_labels(tmp_path, cache_dir):
    table = pq.read_table(make_synthetic_pairs(tmp_path / "base.parquet", 6, 16, seed=2))
    labels = table.column("label_0").to_pylist()
    labels[2], labels[4] = 0.3, None
    path = tmp_path / "labels.parquet"
    pq.write_table(table.set_column(3, "label_0", pa.array(labels, pa.float64())), path)

    with pytest.raises(DataError, match=f"{path} row 2: column label_0 must be 0, 0.5 or 1, got 0.3"):
        _pairs(path, cache_dir, resolution=16)
    dataset = _pairs(path, cache_dir, resolution=16, bad_rows="skip")
    assert dataset.skipped_rows == [2, 4] and len(dataset) == 4


def test_same_key_same_sample_and_epochs_differ(tie_file, cache_dir):
    dataset = _pairs(tie_file, cache_dir, resolution=24, random_flip=True)
    again = _pairs(tie_file, cache_dir, resolution=24, random_flip=True)
    for index in (0, 7):
        first, second = dataset[(index, 3)], again[(index, 3)]
        assert torch.equal(first["pixel_values_w"], second["pixel_values_w"])
        assert torch.equal(first["pixel_values_l"], second["pixel_values_l"])
    assert torch.equal(dataset[5]["pixel_values_w"], dataset[(5, 0)]["pixel_values_w"])

    per_epoch = [dataset[(2, epoch)]["pixel_values_w"] for epoch in range(6)]
    assert any(not torch.equal(per_epoch[0], other) for other in per_epoch[1:])

    other_seed = _pairs(tie_file, cache_dir, resolution=24, seed=1)
    assert any(
        not torch.equal(dataset[(2, e)]["pixel_values_w"], other_seed[(2, e)]["pixel_values_w"]) for e in range(6)
    )


def test_caption_dropout(tie_file, cache_dir):
    always = _pairs(tie_file, cache_dir, proportion_empty_prompts=1.0)
    assert all(always[i]["caption"] == "" for i in range(len(always)))
    assert all(always.captions())  # the stored captions are untouched

    half = _pairs(tie_file, cache_dir, proportion_empty_prompts=0.5)
    captions = [half[(i, e)]["caption"] for i in range(len(half)) for e in range(3)]
    assert 0 < captions.count("") < len(captions)
    assert [half[(i, 1)]["caption"] for i in range(5)] == [half[(i, 1)]["caption"] for i in range(5)]


def test_index_errors(tie_file, cache_dir):
    dataset = _pairs(tie_file, cache_dir)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert dataset[-1]["index"] == len(dataset) - 1


def test_folder_of_parquet_files(tmp_path, cache_dir):
    make_synthetic_pairs(tmp_path / "b.parquet", 5, 16, seed=4)
    make_synthetic_pairs(tmp_path / "a.parquet", 3, 16, seed=3)
    dataset = _pairs(tmp_path, cache_dir, resolution=16)
    assert len(dataset) == 8
    expected = pq.read_table(tmp_path / "a.parquet").column("caption").to_pylist()
    expected += pq.read_table(tmp_path / "b.parquet").column("caption").to_pylist()
    assert dataset.captions() == expected


def test_extra_columns_and_image_struct_form(tmp_path, cache_dir):
    """Hub-style files may hold extra columns and images as {'bytes', 'path'} structs."""
    table = pq.read_table(make_synthetic_pairs(tmp_path / "base.parquet", 4, 16, seed=5))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {name: table.column(name) for name in table.column_names}
    for name in ("jpg_0", "jpg_1"):
        columns[name] = pa.array([{"bytes": b, "path": None} for b in table.column(name).to_pylist()], struct)
    columns["best_image_uid"] = pa.array(["u"] * 4)
    path = tmp_path / "struct.parquet"
    pq.write_table(pa.table(columns), path)

    dataset = _pairs(path, cache_dir, resolution=16, center_crop=True, random_flip=False)
    reference = _pairs(tmp_path / "base.parquet", cache_dir, resolution=16, center_crop=True, random_flip=False)
    assert len(dataset) == 4
    for index in range(4):
        assert torch.equal(dataset[index]["pixel_values_w"], reference[index]["pixel_values_w"])


def test_collate_and_loader_with_sampler(tie_file, cache_dir):
    dataset = _pairs(tie_file, cache_dir, resolution=16)
    sampler = StepIndexedSampler(len(dataset), batch_size=4, total_batches=6, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_pairs, drop_last=False)
    batches = list(loader)
    assert len(loader) == 6 and len(batches) == 6
    for batch, global_batch in zip(batches, range(6)):
        assert batch["pixel_values_w"].shape == (4, 3, 16, 16)
        assert batch["pixel_values_l"].shape == (4, 3, 16, 16)
        assert len(batch["caption"]) == 4
        assert batch["index"] == [index for index, _ in sampler.batch_keys(global_batch)]
    # 20 rows / 4 = 5 batches per epoch: batch 5 is the first of epoch 1.
    assert sampler.batch_keys(5)[0][1] == 1

    with pytest.raises(ValueError):
        collate_pairs([])


def test_loader_workers_give_the_same_batches(tie_file, cache_dir):
    """Items depend only on (seed, index, epoch), so worker processes change nothing."""
    dataset = _pairs(tie_file, cache_dir, resolution=16)

    def run(num_workers):
        sampler = StepIndexedSampler(len(dataset), batch_size=3, total_batches=8, seed=1)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate_pairs, num_workers=num_workers)
        return list(loader)

    for serial, parallel in zip(run(0), run(2)):
        assert serial["index"] == parallel["index"] and serial["caption"] == parallel["caption"]
        assert torch.equal(serial["pixel_values_w"], parallel["pixel_values_w"])
        assert torch.equal(serial["pixel_values_l"], parallel["pixel_values_l"])
