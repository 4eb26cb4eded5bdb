"""Tests of alignment.data.cache: the on-disk cache of VAE posteriors and prompt embeddings (offline, CPU)."""

import io
import json
import math
import os
import pickle
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from alignment.backbones.tiny import build_tiny_backbone
from alignment.data.cache import (MANIFEST_NAME, CachedPairs, cache_folder, cache_key, cached_pairs,
                                  collate_cached)
from alignment.data.pickapic import PreferencePairs, augmentation_seed, collate_pairs
from alignment.data.synthetic import encode_jpeg, make_synthetic_pairs
from alignment.errors import ConfigError

RES = 32
ROWS = 16


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_backbone()


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """16 synthetic rows whose images are made non-square (48x40 / 40x48), so the centre crop moves pixels."""
    path = make_synthetic_pairs(tmp_path_factory.mktemp("pairs") / "p.parquet", num_rows=ROWS)
    table = pq.read_table(path)

    def reshape(column):
        out = []
        for row, data in enumerate(table.column(column).to_pylist()):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            out.append(encode_jpeg(image.resize((48, 40) if row % 2 == 0 else (40, 48), Image.Resampling.BILINEAR)))
        return out

    table = table.set_column(1, "jpg_0", [reshape("jpg_0")]).set_column(2, "jpg_1", [reshape("jpg_1")])
    pq.write_table(table, path)
    return path


def _pairs(path, hf_cache, **kwargs):
    kwargs.setdefault("resolution", RES)
    kwargs.setdefault("center_crop", True)
    return PreferencePairs(str(path), hf_cache_dir=hf_cache, **kwargs)


def _cfg(tmp_path, **kwargs):
    return OmegaConf.create({"center_crop": True, "random_flip": True, "cache": True,
                             "cache_dir": str(tmp_path / "latents"), "num_workers": 0, **kwargs})


class Counter:
    """Wraps a backbone encoder and counts its calls (thread-safe)."""

    def __init__(self, fn):
        self.fn, self.calls, self.lock = fn, 0, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
        return self.fn(*args, **kwargs)


def _decisions(seed, index, epoch, p_empty):
    """PreferencePairs' draws, re-derived independently: (caption dropped, flipped)."""
    rng = torch.Generator().manual_seed(augmentation_seed(seed, index, epoch))
    drop = torch.rand(1, generator=rng).item() < p_empty
    return drop, torch.rand(3, generator=rng)[2].item() < 0.5


# ------------------------------------------------------------------------------------------------- equivalence

def test_cached_training_step_equals_uncached(tmp_path, pairs_file, hf_cache):
    from alignment.objectives.dpo import DiffusionDPO
    from alignment.training.module import AlignmentModule

    backbone = build_tiny_backbone()
    module = AlignmentModule(backbone, DiffusionDPO(beta=5000), finetune="lora", lora={"rank": 4, "alpha": 4})
    assert module.global_step == 0  # Lightning: 0 without a trainer
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init makes policy == reference and the loss a constant log 2
        for name, param in backbone.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))

    dataset = _pairs(pairs_file, hf_cache, random_flip=True, proportion_empty_prompts=0.5, seed=0)
    # Encoder batches of 16 like the training batches below, so that the VAE's per-sample arithmetic (which
    # depends on the batch size, not on the other samples' values) is the same in both paths.
    cached = cached_pairs(dataset, backbone, _cfg(tmp_path), batch_size=16)
    assert cached.built and len(cached) == len(dataset) == ROWS
    assert cached.manifest["num_prompts"] == len(set(dataset.captions()) | {""})

    # one training batch of 16 keys over several epochs: every row, flipped and not, captions kept and dropped
    keys = [(i, i % 3) for i in range(ROWS)]
    decisions = [_decisions(0, i, e, 0.5) for i, e in keys]
    assert set(decisions) == {(False, False), (False, True), (True, False), (True, True)}

    raw_items, cached_items = [dataset[k] for k in keys], [cached[k] for k in keys]
    assert [c["caption"] for c in cached_items] == [r["caption"] for r in raw_items]
    assert [c["index"] for c in cached_items] == [r["index"] for r in raw_items]
    raw = module.to_batch(collate_pairs(raw_items))
    hit = module.to_batch(cached.collate_fn(cached_items))
    torch.testing.assert_close(hit.latents_w, raw.latents_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(hit.latents_l, raw.latents_l, atol=1e-5, rtol=0)
    assert hit.cond.keys() == raw.cond.keys() == {"encoder_hidden_states"}
    for name in raw.cond:
        torch.testing.assert_close(hit.cond[name], raw.cond[name], atol=1e-5, rtol=0)
    assert hit.index.tolist() == raw.index.tolist() and hit.step == raw.step and hit.captions == raw.captions
    # in fact bit-identical, memory layout included (CPU VAE output is channels-last; the cache keeps it)
    assert torch.equal(hit.latents_w, raw.latents_w) and torch.equal(hit.latents_l, raw.latents_l)
    assert hit.latents_w.stride() == raw.latents_w.stride()
    loss_raw = module.objective(module.backbone, raw, seed=0).loss
    loss_hit = module.objective(module.backbone, hit, seed=0).loss
    assert torch.equal(loss_hit, loss_raw), (loss_hit.item(), loss_raw.item())
    assert abs(loss_raw.item() - math.log(2)) > 1e-3  # the loss really depends on the latents

    # Encoder batches of another size: equal up to float rounding, which beta=5000 amplifies in the loss.
    other = cached_pairs(dataset, backbone, _cfg(tmp_path / "b3"), batch_size=3)
    batch_keys = keys[:6]
    raw = module.to_batch(collate_pairs([dataset[k] for k in batch_keys]))
    hit = module.to_batch(other.collate_fn([other[k] for k in batch_keys]))
    torch.testing.assert_close(hit.latents_w, raw.latents_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(hit.latents_l, raw.latents_l, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.objective(backbone, hit, seed=0).loss,
                               module.objective(backbone, raw, seed=0).loss, atol=0, rtol=1e-3)


def test_items_are_pure_and_dropped_captions_use_empty_prompt(tmp_path, backbone, pairs_file, hf_cache):
    dataset = _pairs(pairs_file, hf_cache, random_flip=True, proportion_empty_prompts=0.5, seed=3)
    cached = cached_pairs(dataset, backbone, _cfg(tmp_path))
    # the same cache cut into several small shards serves the same tensors (up to the rounding differences of
    # other encoder batch sizes: batches never straddle a shard)
    sharded = cached_pairs(dataset, backbone, _cfg(tmp_path / "sharded"), moment_shard_rows=5, prompt_shard_rows=2)
    assert len(sharded.manifest["moment_shards"]) == 4 and len(sharded.manifest["prompt_shards"]) > 4
    for key in [(i, e) for i in range(ROWS) for e in (0, 1)]:
        for name, value in cached[key].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(sharded[key][name], value, atol=1e-5, rtol=0)
            else:
                assert sharded[key][name] == value
    empty = backbone.encode_prompt([""])["encoder_hidden_states"][0]
    seen_drop = seen_keep = False
    for key in [(i, e) for i in range(ROWS) for e in (0, 5)]:
        item = cached[key]
        assert set(item) == {"moments_w", "moments_l", "cond.encoder_hidden_states", "caption", "index",
                             "original_size", "crop_top_left", "extras"}
        assert item["extras"] == {}  # no dataset.extra_columns
        assert item["moments_w"].shape == (8, RES // 2, RES // 2) and item["moments_w"].dtype == torch.float32
        torch.testing.assert_close(cached[key]["moments_l"], item["moments_l"], atol=0, rtol=0)  # pure
        drop, _ = _decisions(3, key[0], key[1], 0.5)
        if drop:
            seen_drop = True
            assert item["caption"] == ""
            torch.testing.assert_close(item["cond.encoder_hidden_states"], empty, atol=1e-6, rtol=0)
        else:
            seen_keep = True
            assert item["caption"] == dataset.captions()[key[0]]
    assert seen_drop and seen_keep
    assert cached[2]["index"] == cached[(2, 0)]["index"] == cached[-14]["index"] == 2
    with pytest.raises(IndexError):
        cached[ROWS]

    # picklable for DataLoader workers (open shard handles are not carried over), and its collate_fn
    clone = pickle.loads(pickle.dumps(cached))
    torch.testing.assert_close(clone[(4, 1)]["moments_w"], cached[(4, 1)]["moments_w"], atol=0, rtol=0)
    batch = collate_cached([cached[(i, 0)] for i in range(4)])
    assert batch["moments_w"].shape == (4, 8, RES // 2, RES // 2)
    assert batch["cond.encoder_hidden_states"].shape[0] == 4 and batch["index"] == [0, 1, 2, 3]


def test_unflipped_cache_matches_encoder(tmp_path, backbone, pairs_file, hf_cache):
    dataset = _pairs(pairs_file, hf_cache, random_flip=False)
    cached = cached_pairs(dataset, backbone, _cfg(tmp_path, random_flip=False))
    assert not cached.random_flip
    files = {name for name in os.listdir(cached.folder)}
    assert MANIFEST_NAME in files
    from safetensors import safe_open
    with safe_open(str(cached.folder / cached.manifest["moment_shards"][0]), framework="pt") as f:
        assert sorted(f.keys()) == ["moments_l", "moments_w"]
    for key in [(0, 0), (7, 2)]:
        raw = dataset[key]
        mean, std = backbone.encode_moments(raw["pixel_values_w"][None])
        torch.testing.assert_close(cached[key]["moments_w"], torch.cat([mean, std], 1)[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- build / load

def test_second_call_loads_without_encoding(tmp_path, backbone, pairs_file, hf_cache, monkeypatch):
    dataset = _pairs(pairs_file, hf_cache)
    cfg = _cfg(tmp_path)
    first = cached_pairs(dataset, backbone, cfg)
    assert first.built and (first.folder / MANIFEST_NAME).exists()
    assert first.folder.parent == tmp_path / "latents" and first.folder == cache_folder(dataset, backbone, cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was recomputed instead of loaded")

    monkeypatch.setattr(backbone, "encode_moments", refuse)
    monkeypatch.setattr(backbone, "encode_prompt", refuse)
    second = cached_pairs(_pairs(pairs_file, hf_cache), backbone, cfg)
    assert not second.built and second.folder == first.folder and isinstance(second, CachedPairs)
    direct = CachedPairs(first.folder, captions=dataset.captions(), seed=dataset.seed)  # from the folder alone
    for key in [(0, 0), (5, 1), (15, 4)]:
        a, b, c = first[key], second[key], direct[key]
        for name in ("moments_w", "moments_l", "cond.encoder_hidden_states"):
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
            torch.testing.assert_close(a[name], c[name], atol=0, rtol=0)


def test_incomplete_or_damaged_folder_is_rebuilt(tmp_path, backbone, pairs_file, hf_cache, monkeypatch):
    dataset = _pairs(pairs_file, hf_cache)
    cfg = _cfg(tmp_path)
    folder = cached_pairs(dataset, backbone, cfg).folder
    reference = cached_pairs(dataset, backbone, cfg)[(3, 1)]["moments_w"].clone()

    counter = Counter(backbone.encode_moments)
    monkeypatch.setattr(backbone, "encode_moments", counter)
    # A crashed build: no manifest, a truncated shard and a stray temporary file.
    (folder / MANIFEST_NAME).unlink()
    shard = folder / "moments-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    (folder / ".moments-00000.safetensors.123.tmp").write_bytes(b"junk")
    rebuilt = cached_pairs(dataset, backbone, cfg)
    assert rebuilt.built and counter.calls > 0 and rebuilt.folder == folder
    assert not any(name.endswith(".tmp") for name in os.listdir(folder))
    torch.testing.assert_close(rebuilt[(3, 1)]["moments_w"], reference, atol=0, rtol=0)

    # A manifest whose shard was damaged afterwards (size mismatch) is not trusted either.
    calls = counter.calls
    shard.write_bytes(shard.read_bytes()[:-8])
    again = cached_pairs(dataset, backbone, cfg)
    assert again.built and counter.calls > calls
    assert not cached_pairs(dataset, backbone, cfg).built


def test_concurrent_builders_build_once(tmp_path, backbone, pairs_file, hf_cache, monkeypatch):
    """Like DDP ranks: all start together, one builds under the flock, the others wait and load.
    (flock conflicts between separate open() calls, so threads exercise the same lock as processes.)"""
    dataset = _pairs(pairs_file, hf_cache)
    cfg = _cfg(tmp_path)
    counter = Counter(backbone.encode_moments)
    monkeypatch.setattr(backbone, "encode_moments", counter)
    barrier, results, errors = threading.Barrier(3), [None] * 3, []

    def worker(rank):
        try:
            barrier.wait()
            results[rank] = cached_pairs(dataset, backbone, cfg)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sum(r.built for r in results) == 1
    assert counter.calls == 4  # one batch of 16 pairs x (w, l, w flipped, l flipped): a single build
    for r in results[1:]:
        torch.testing.assert_close(r[(9, 2)]["moments_l"], results[0][(9, 2)]["moments_l"], atol=0, rtol=0)


def test_store_dtype_option(tmp_path, backbone, pairs_file, hf_cache):
    dataset = _pairs(pairs_file, hf_cache)
    full = cached_pairs(dataset, backbone, _cfg(tmp_path))
    half = cached_pairs(dataset, backbone, _cfg(tmp_path, cache_dtype="float16"))
    assert full.manifest["store_dtype"] == "float32" and half.manifest["store_dtype"] == "float16"
    assert half.folder != full.folder
    item_full, item_half = full[(6, 1)], half[(6, 1)]
    assert item_half["moments_w"].dtype == torch.float32  # returned in the backbone's weight dtype
    torch.testing.assert_close(item_half["moments_w"], item_full["moments_w"], atol=1e-2, rtol=1e-2)
    with pytest.raises(ConfigError, match="dataset.cache_dtype"):
        cached_pairs(dataset, backbone, _cfg(tmp_path, cache_dtype="int8"))


# ---------------------------------------------------------------------------------------------------- keys

def test_key_changes_with_inputs(tmp_path, backbone, pairs_file, hf_cache):
    dataset = _pairs(pairs_file, hf_cache)
    cfg = _cfg(tmp_path)
    key, fields = cache_key(dataset, backbone, cfg)
    assert cache_key(_pairs(pairs_file, hf_cache), backbone, cfg)[0] == key  # deterministic
    assert fields["source"]["path"] == str(pairs_file.resolve())
    assert cache_key(dataset, build_tiny_backbone(), cfg)[0] == key  # same weights, another object
    json.dumps(fields)

    assert cache_key(_pairs(pairs_file, hf_cache, resolution=16), backbone, cfg)[0] != key
    assert cache_key(_pairs(pairs_file, hf_cache, random_flip=False), backbone, cfg)[0] != key
    assert cache_key(_pairs(pairs_file, hf_cache, max_rows=12), backbone, cfg)[0] != key
    assert cache_key(dataset, backbone, _cfg(tmp_path, cache_dtype="bfloat16"))[0] != key
    # seed and caption dropout are applied per item, not stored: same cache
    assert cache_key(_pairs(pairs_file, hf_cache, seed=9, proportion_empty_prompts=0.3), backbone, cfg)[0] == key

    for module in (backbone.vae, backbone.text_encoder):
        param = list(module.parameters())[len(list(module.parameters())) // 2]
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(1e-3)
        try:
            assert cache_key(dataset, backbone, cfg)[0] != key, type(module).__name__
        finally:
            with torch.no_grad():
                param.copy_(saved)
    assert cache_key(dataset, backbone, cfg)[0] == key
    other_name = build_tiny_backbone(name="tiny2")
    assert cache_key(dataset, other_name, cfg)[0] != key

    stat = os.stat(pairs_file)  # the source file changed (mtime)
    os.utime(pairs_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert cache_key(dataset, backbone, cfg)[0] != key
    finally:
        os.utime(pairs_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_needs_center_crop(tmp_path, backbone, pairs_file, hf_cache):
    message = "dataset.cache needs dataset.center_crop=true (random crops cannot be precomputed)"
    with pytest.raises(ConfigError) as err:
        cached_pairs(_pairs(pairs_file, hf_cache), backbone, _cfg(tmp_path, center_crop=False))
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        cached_pairs(_pairs(pairs_file, hf_cache, center_crop=False), backbone, _cfg(tmp_path))
    assert str(err.value) == message
    assert not (tmp_path / "latents").exists()


def test_cached_geometry_matches_the_raw_items_for_non_square_images(tmp_path):
    """SDXL's original_size / crop_top_left must survive caching, including the mirrored crop of a flip."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.data.cache import cached_pairs
    from alignment.data.pickapic import PreferencePairs

    def jpeg(w, h, seed):
        rng = torch.Generator().manual_seed(seed)
        pixels = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        return buffer.getvalue()

    sizes = [(80, 40), (40, 72), (50, 50), (96, 40)]
    table = pa.table({"jpg_0": [jpeg(w, h, i) for i, (w, h) in enumerate(sizes)],
                      "jpg_1": [jpeg(w, h, 10 + i) for i, (w, h) in enumerate(sizes)],
                      "label_0": [1.0, 0.0, 1.0, 0.0], "caption": ["a", "b", "c", "d"]})
    pq.write_table(table, tmp_path / "wide.parquet")
    raw = PreferencePairs(tmp_path / "wide.parquet", resolution=32, center_crop=True, random_flip=True, seed=3)
    cfg = {"center_crop": True, "cache_dir": str(tmp_path / "cache"), "random_flip": True}
    cached = cached_pairs(raw, build_tiny_backbone(), cfg)
    flips = set()
    for index in range(len(raw)):
        for epoch in range(4):
            a, b = raw[(index, epoch)], cached[(index, epoch)]
            assert a["original_size"].tolist() == b["original_size"].tolist()
            assert a["crop_top_left"].tolist() == b["crop_top_left"].tolist(), (index, epoch)
            flips.add(tuple(a["crop_top_left"].tolist()))
    assert len(flips) > len(sizes)  # some crops were mirrored
