"""An on-disk cache of VAE posteriors and prompt embeddings, so that training skips both encoders.

``cached_pairs(dataset, backbone, cfg.dataset)`` encodes every item of a :class:`PreferencePairs` dataset once:

- the VAE posterior moments ``concat([mean, std], dim=1)`` of the preferred and the dispreferred image, unflipped
  and (with ``random_flip``) flipped, since a flipped image's latent is not the flipped latent;
- the prompt embeddings of each *unique* caption, plus the empty prompt ``""`` that caption dropout uses.

and returns a :class:`CachedPairs` dataset that serves them. Its items make exactly the random decisions that
:class:`PreferencePairs` makes for the same ``(seed, index, epoch)`` (caption dropout, then crop, then flip), and the
training module samples ``z = (mean + std · n) · scaling_factor`` with the same per-sample noise in both paths, so a
cached training step computes the same latents and the same loss as an uncached one.

Only a centre crop can be cached (a random crop would need one latent per crop position).

Layout of a cache folder ``<cache_dir>/<backbone name>-<key>/``::

    .lock                          flock'ed while the cache is built (DDP ranks wait, then load)
    prompts-00000.safetensors      cond.<name>: (n, ...) embeddings of unique captions; row 0 is ""
    index.safetensors              caption_id: (N,) int64, dataset index -> unique caption row
    moments-00000.safetensors      moments_w, moments_l (+ moments_w_flip, moments_l_flip): (n, 2C, h, w)
    manifest.json                  written last; a folder without it is incomplete and is rebuilt

The key hashes everything the stored tensors depend on: the source (absolute path + size + mtime of local files,
or hub id + split), the kept rows, their captions and winners, resolution, centre crop, flip, the backbone's class,
name and source, a fingerprint of the VAE, text encoder and tokenizer (evenly spaced samples of every tensor's
bytes), the weight dtype and the storage dtype. Shards are written atomically (temporary file + ``os.replace``).

Config keys read from ``data_cfg`` (``cfg.dataset``): ``center_crop`` (must be true), ``cache_dir`` (required),
and the optional ``cache_dtype`` (``float32`` default | ``float16`` | ``bfloat16`` | ``weight``: the backbone's
weight dtype), ``cache_batch_size`` (16), ``cache_device`` (null: the backbone's device | ``auto``: this process's
GPU when there is one | a torch device string), ``num_workers`` (image decoding processes while building).

Example::

    dataset = cached_pairs(PreferencePairs(path, resolution=512, center_crop=True), backbone, cfg.dataset)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=dataset.collate_fn)
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from alignment.data.images import PairTransform
from alignment.data.extras import collate_extras
from alignment.dtypes import parse_dtype
from alignment.data.pickapic import augmentation_seed, collate_pairs, resolve_key
from alignment.errors import ConfigError
from alignment.files import atomic_write, atomic_write_text
from alignment.fingerprint import backbone_fingerprint  # the VAE + text encoder fingerprint in cache_key

CACHE_FORMAT = 2
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
INDEX_NAME = "index.safetensors"
GEOMETRY_NAME = "geometry.safetensors"  # original_size, crop_top_left(_flip) per row: SDXL micro-conditioning
DEFAULT_BATCH_SIZE = 16
MOMENT_SHARD_ROWS = 512     # dataset items per moments shard (SD 1.5 at 512 px, with flips: 256 MB in float32)
PROMPT_SHARD_ROWS = 1024    # unique captions per prompt shard (SD 1.5: 236 MB in float32)
MAX_OPEN_SHARDS = 64        # per process; older handles are closed (dropped) first
PROGRESS_SECONDS = 10.0


def _log(message: str) -> None:
    print(f"latent cache: {message}", file=sys.stderr, flush=True)


def _sha(parts) -> str:
    """Digest of an iterable of strings (streamed: a million captions never become one string)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ keys

def source_fingerprint(source: str, split: str) -> dict[str, Any]:
    """Identity of a dataset source: absolute path, size and mtime of local files, else hub id and split."""
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():  # PreferencePairs reads the folder's *.parquet files in sorted order
            files = sorted(p for p in path.glob("*.parquet") if p.is_file())
            stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
            return {"path": str(path), "files": stats}
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"hub": str(source), "split": str(split)}


def _store_dtype(data_cfg, backbone) -> torch.dtype:
    name = data_cfg.get("cache_dtype", None) or "float32"
    if name == "weight":
        return backbone.weight_dtype
    return parse_dtype(name, "dataset.cache_dtype")


def _check_cacheable(dataset, data_cfg) -> None:
    if not data_cfg.get("center_crop", False) or not dataset.transform.center_crop:
        raise ConfigError("dataset.cache needs dataset.center_crop=true (random crops cannot be precomputed)")


def cache_key(dataset, backbone, data_cfg) -> tuple[str, dict[str, Any]]:
    """``(hex key, the fields it hashes)`` of the cache for ``dataset`` encoded by ``backbone``."""
    _check_cacheable(dataset, data_cfg)
    winner_first = getattr(dataset, "_winner_first", None)
    fields = {
        "format": CACHE_FORMAT,
        "source": source_fingerprint(dataset.source, getattr(dataset, "split", "train")),
        "num_items": len(dataset),
        "rows": _sha(map(str, dataset.rows())),
        "winner_first": _sha("1" if w else "0" for w in winner_first) if winner_first is not None else None,
        "captions": _sha(dataset.captions()),
        "resolution": int(dataset.transform.resolution),
        "center_crop": True,
        "random_flip": bool(dataset.transform.random_flip),
        "backbone": backbone_fingerprint(backbone),
        "store_dtype": str(_store_dtype(data_cfg, backbone)),
    }
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest(), fields


def cache_folder(dataset, backbone, data_cfg) -> Path:
    """The folder under ``data_cfg.cache_dir`` that holds (or will hold) this cache."""
    key, _ = cache_key(dataset, backbone, data_cfg)
    return _folder_for(key, backbone, data_cfg)


def _folder_for(key: str, backbone, data_cfg) -> Path:
    root = data_cfg.get("cache_dir", None)
    if not root:
        raise ConfigError("dataset.cache_dir must be set when dataset.cache=true")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(backbone, "name", "") or "backbone"))[:40]
    return Path(os.path.abspath(Path(str(root)).expanduser())) / f"{slug}-{key[:24]}"


# -------------------------------------------------------------------------------------------------- files

def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)), fsync=True)


def _read_manifest(folder: Path, key: str) -> dict | None:
    """The manifest of a complete cache with this key, or ``None`` (missing, other key, or a file is missing)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
        return None
    for name, size in manifest.get("files", {}).items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


@contextmanager
def _exclusive(lock_path: Path, folder: Path):
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process to finish building {folder}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _clear_incomplete(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# -------------------------------------------------------------------------------------------------- build

def _resolve_device(data_cfg, backbone, device) -> torch.device:
    device = device if device is not None else data_cfg.get("cache_device", None)
    if device is None:
        return torch.device(backbone.device)
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device(backbone.device)
    return torch.device(str(device))


def _unique_captions(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique captions with ``""`` first, and each item's row in that list."""
    unique: dict[str, int] = {"": 0}
    ids = [unique.setdefault(caption, len(unique)) for caption in captions]
    return list(unique), torch.tensor(ids, dtype=torch.int64)


def _build(folder: Path, key: str, fields: dict, dataset, backbone, data_cfg, batch_size: int,
           device: torch.device, moment_shard_rows: int, prompt_shard_rows: int) -> dict:
    start_time = time.monotonic()
    store_dtype = _store_dtype(data_cfg, backbone)
    random_flip = bool(dataset.transform.random_flip)
    n_items = len(dataset)
    unique, caption_ids = _unique_captions(dataset.captions())
    _log(f"building {folder} ({n_items} pairs{' + flips' if random_flip else ''}, {len(unique)} prompts, "
         f"batch {batch_size}, {device}, {str(store_dtype).replace('torch.', '')})")
    files: list[str] = []

    # Prompts first (cheap): embeddings of the unique captions, in shards.
    prompt_shards, cond_shapes = [], {}
    for shard_start in range(0, len(unique), prompt_shard_rows):
        shard_captions = unique[shard_start:shard_start + prompt_shard_rows]
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(shard_captions), batch_size):
            with torch.no_grad():
                cond = backbone.encode_prompt(shard_captions[i:i + batch_size])
            for name, value in cond.items():
                parts.setdefault(name, []).append(value.detach().to("cpu", store_dtype))
        tensors = {f"cond.{name}": torch.cat(values) for name, values in parts.items()}
        cond_shapes = {name: list(values[0].shape[1:]) for name, values in parts.items()}
        name = f"prompts-{len(prompt_shards):05d}.safetensors"
        _atomic_save(tensors, folder / name)
        prompt_shards.append(name)
        files.append(name)
    _atomic_save({"caption_id": caption_ids}, folder / INDEX_NAME)
    files.append(INDEX_NAME)

    # Images: the dataset's own decode/resize/centre-crop, never flipped and never dropping the caption; the
    # flipped variant is the exact pixel mirror of the unflipped one (as PIL's transpose in PairTransform).
    view = copy.copy(dataset)
    view.transform = PairTransform(dataset.transform.resolution, center_crop=True, random_flip=False)
    view.proportion_empty_prompts = 0.0
    batches = [list(range(i, min(i + batch_size, s + moment_shard_rows, n_items)))
               for s in range(0, n_items, moment_shard_rows)
               for i in range(s, min(s + moment_shard_rows, n_items), batch_size)]
    num_workers = int(data_cfg.get("num_workers", 0) or 0)
    loader = DataLoader(view, batch_sampler=batches, collate_fn=collate_pairs, num_workers=num_workers)
    variants = ["moments_w", "moments_l"] + (["moments_w_flip", "moments_l_flip"] if random_flip else [])
    moment_shards, parts, done, last_print, moment_shape = [], {v: [] for v in variants}, 0, time.monotonic(), None
    layout = {"channels_last": False}

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean, std = backbone.encode_moments(pixels)
        # Remember the encoder's memory layout (oneDNN on CPU returns channels-last): batches are served in it, so
        # that every later op (and its rounding) is the same as on freshly encoded latents.
        layout["channels_last"] = mean.dim() == 4 and mean.shape[1] > 1 and mean.stride(1) == 1
        return torch.cat([mean, std], dim=1).detach().to("cpu", store_dtype)

    geometry: dict[str, list[torch.Tensor]] = {"original_size": [], "crop_top_left": [], "crop_top_left_flip": []}
    resolution = dataset.transform.resolution
    for batch in loader:
        # SDXL micro-conditioning per row; a flip mirrors the crop's left edge in the resized image.
        sizes, crops = batch["original_size"], batch["crop_top_left"]
        resized_w = torch.tensor([max(resolution, round(w * resolution / min(h, w))) if w > h else resolution
                                  for h, w in sizes.tolist()])
        geometry["original_size"].append(sizes)
        geometry["crop_top_left"].append(crops)
        geometry["crop_top_left_flip"].append(torch.stack([crops[:, 0], resized_w - crops[:, 1] - resolution], 1))
        pixels = {"moments_w": batch["pixel_values_w"], "moments_l": batch["pixel_values_l"]}
        if random_flip:
            pixels["moments_w_flip"] = batch["pixel_values_w"].flip(-1)
            pixels["moments_l_flip"] = batch["pixel_values_l"].flip(-1)
        for variant in variants:
            parts[variant].append(encode(pixels[variant]))
        done += len(batch["index"])
        if done % moment_shard_rows == 0 or done == n_items:
            tensors = {variant: torch.cat(values) for variant, values in parts.items()}
            moment_shape = list(tensors["moments_w"].shape[1:])
            name = f"moments-{len(moment_shards):05d}.safetensors"
            _atomic_save(tensors, folder / name)
            moment_shards.append(name)
            files.append(name)
            parts = {v: [] for v in variants}
        if time.monotonic() - last_print > PROGRESS_SECONDS and done < n_items:
            last_print = time.monotonic()
            elapsed = last_print - start_time
            _log(f"encoded {done}/{n_items} pairs ({elapsed:.0f}s, ~{elapsed * (n_items - done) / done:.0f}s left)")

    _atomic_save({name: torch.cat(values) for name, values in geometry.items()}, folder / GEOMETRY_NAME)
    files.append(GEOMETRY_NAME)
    manifest = {
        "format": CACHE_FORMAT, "key": key, "fields": fields, "num_items": n_items, "random_flip": random_flip,
        "store_dtype": str(store_dtype).replace("torch.", ""), "moment_shape": moment_shape,
        "channels_last": layout["channels_last"],
        "moment_shard_rows": moment_shard_rows, "moment_shards": moment_shards,
        "prompt_shard_rows": prompt_shard_rows, "prompt_shards": prompt_shards, "num_prompts": len(unique),
        "cond": cond_shapes, "files": {name: (folder / name).stat().st_size for name in files},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(time.monotonic() - start_time, 3),
    }
    atomic_write_text(json.dumps(manifest, indent=1), folder / MANIFEST_NAME, fsync=True)  # last: marks the cache complete
    _log(f"wrote {folder} ({n_items} pairs, {len(unique)} prompts) in {time.monotonic() - start_time:.1f}s")
    return manifest


def cached_pairs(dataset, backbone, data_cfg, *, batch_size: int | None = None, device=None,
                 moment_shard_rows: int = MOMENT_SHARD_ROWS,
                 prompt_shard_rows: int = PROMPT_SHARD_ROWS) -> "CachedPairs":
    """Builds (once) or loads the latent cache of ``dataset`` and returns it as a :class:`CachedPairs`.

    Args:
        dataset: A :class:`~alignment.data.pickapic.PreferencePairs` with ``center_crop=True``.
        backbone: The backbone whose ``encode_moments`` / ``encode_prompt`` fill the cache.
        data_cfg: ``cfg.dataset`` (or a dict): ``center_crop``, ``cache_dir`` and the optional ``cache_dtype``,
            ``cache_batch_size``, ``cache_device``, ``num_workers`` (see the module docstring).
        batch_size: Images / prompts per encoder call (default ``cache_batch_size`` or 16).
        device: Where to encode (default ``cache_device`` or the backbone's device). When it is not the backbone's
            device, the backbone is moved there for the build and moved back afterwards.

    Concurrent callers (DDP ranks) with the same key are serialised by an exclusive ``flock`` on the folder's
    lock file: one builds, the others wait and then load. Raises :class:`ConfigError` without a centre crop.
    """
    key, fields = cache_key(dataset, backbone, data_cfg)
    folder = _folder_for(key, backbone, data_cfg)
    batch_size = int(batch_size or data_cfg.get("cache_batch_size", None) or DEFAULT_BATCH_SIZE)
    if batch_size < 1:
        raise ConfigError(f"dataset.cache_batch_size must be >= 1, got {batch_size}")
    built = False
    manifest = _read_manifest(folder, key)
    if manifest is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / LOCK_NAME, folder):
            manifest = _read_manifest(folder, key)  # another process may have finished it while we waited
            if manifest is None:
                _clear_incomplete(folder)
                target = _resolve_device(data_cfg, backbone, device)
                original = torch.device(backbone.device)
                if target != original:
                    backbone.to(target)
                try:
                    manifest = _build(folder, key, fields, dataset, backbone, data_cfg, batch_size, target,
                                      moment_shard_rows, prompt_shard_rows)
                finally:
                    if target != original:
                        backbone.to(original)
                        if target.type == "cuda":
                            torch.cuda.empty_cache()
                built = True
    if not built:
        _log(f"using {folder} ({manifest['num_items']} pairs, {manifest['num_prompts']} prompts)")
    cached = CachedPairs(folder, captions=dataset.captions(), seed=dataset.seed, extras=dataset.extra_values(),
                         proportion_empty_prompts=dataset.proportion_empty_prompts,
                         dtype=getattr(backbone, "weight_dtype", None), source=dataset.source, manifest=manifest)
    cached.built = built
    return cached


# ------------------------------------------------------------------------------------------------ dataset

def collate_cached(items: Sequence[dict[str, Any]], channels_last: bool = False) -> dict[str, Any]:
    """Collates :class:`CachedPairs` items: tensors stacked (the ``(B, 2C, h, w)`` moments in channels-last
    memory layout if ``channels_last``), ``caption`` and ``index`` as lists."""
    if not items:
        raise ValueError("collate_cached needs at least one item")
    batch: dict[str, Any] = {}
    for key, value in items[0].items():
        if isinstance(value, torch.Tensor):
            stacked = torch.stack([item[key] for item in items])
            if channels_last and key.startswith("moments_") and stacked.dim() == 4:
                stacked = stacked.contiguous(memory_format=torch.channels_last)
            batch[key] = stacked
    batch["caption"] = [item["caption"] for item in items]
    batch["index"] = [int(item["index"]) for item in items]
    batch["extras"] = collate_extras(items)
    return batch


class CollateCached:
    """``collate_cached`` with the cache's memory layout bound (picklable, for DataLoader workers)."""

    def __init__(self, channels_last: bool = False):
        self.channels_last = bool(channels_last)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_cached(items, self.channels_last)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels_last={self.channels_last})"


class CachedPairs(Dataset):
    """The cached counterpart of :class:`~alignment.data.pickapic.PreferencePairs` (see :func:`cached_pairs`).

    Same length and keys (``index`` or ``(index, epoch)``); an item is a pure function of ``(seed, index, epoch)``
    drawing the same numbers in the same order as ``PreferencePairs`` (caption dropout, crop top, crop left,
    flip), and holds ``moments_w`` / ``moments_l`` (``(2C, h, w)``: posterior mean and std, of the flipped images
    when the flip is drawn), ``cond.<name>`` (the caption's embedding, or the empty prompt's when the caption is
    dropped), ``caption``, ``index`` and ``extras`` (the source dataset's extra columns, ``extras``: column -> one
    value per item, served from memory). Tensors are read lazily from memory-mapped safetensors shards and
    returned in ``dtype`` (the backbone's weight dtype: what the encoders would have returned).

    ``collate_fn`` (an attribute) batches items in the memory layout the VAE produced when the cache was built;
    use it as the DataLoader's ``collate_fn``.
    """

    def __init__(self, folder: str | os.PathLike, captions: Sequence[str], seed: int = 0,
                 proportion_empty_prompts: float = 0.0, dtype: torch.dtype | None = None,
                 source: str | None = None, manifest: dict | None = None, extras: dict | None = None):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else json.loads((self.folder / MANIFEST_NAME).read_text())
        self.seed = int(seed)
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.random_flip = bool(self.manifest["random_flip"])
        self.dtype = dtype
        self.source = source
        self.built = False
        self._captions = list(captions)
        self._extras = {column: list(values) for column, values in (extras or {}).items()}
        if len(self._captions) != self.manifest["num_items"]:
            raise ValueError(f"{self.folder}: {len(self._captions)} captions for {self.manifest['num_items']} items")
        self._caption_ids = load_file(str(self.folder / INDEX_NAME))["caption_id"]
        self._geometry = load_file(str(self.folder / GEOMETRY_NAME))
        self._cond_names = sorted(self.manifest["cond"])
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.collate_fn = CollateCached(self.manifest.get("channels_last", False))

    def __getstate__(self) -> dict:  # open shard handles stay in their process (DataLoader workers reopen)
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def captions(self) -> list[str]:
        return list(self._captions)

    def _shard(self, name: str):
        from safetensors import safe_open

        handle = self._handles.get(name)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
            handle = self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        else:
            self._handles.move_to_end(name)
        return handle

    def _row(self, shard: str, tensor: str, row: int) -> torch.Tensor:
        value = self._shard(shard).get_slice(tensor)[row:row + 1][0]
        return value if self.dtype is None else value.to(self.dtype)

    def _resolve_key(self, key) -> tuple[int, int]:
        return resolve_key(key, len(self), type(self).__name__)

    def __getitem__(self, key) -> dict[str, Any]:
        index, epoch = self._resolve_key(key)
        # Exactly PreferencePairs.__getitem__'s draws: caption dropout, then PairTransform's (top, left, flip).
        rng = torch.Generator().manual_seed(augmentation_seed(self.seed, index, epoch))
        drop_caption = torch.rand(1, generator=rng).item() < self.proportion_empty_prompts
        _, _, u_flip = torch.rand(3, generator=rng).tolist()
        flip = self.random_flip and u_flip < 0.5

        m = self.manifest
        shard, row = divmod(index, m["moment_shard_rows"])
        suffix = "_flip" if flip else ""
        item: dict[str, Any] = {
            "moments_w": self._row(m["moment_shards"][shard], "moments_w" + suffix, row),
            "moments_l": self._row(m["moment_shards"][shard], "moments_l" + suffix, row),
        }
        caption_id = 0 if drop_caption else int(self._caption_ids[index])
        shard, row = divmod(caption_id, m["prompt_shard_rows"])
        for name in self._cond_names:
            item[f"cond.{name}"] = self._row(m["prompt_shards"][shard], f"cond.{name}", row)
        item["original_size"] = self._geometry["original_size"][index]
        item["crop_top_left"] = self._geometry["crop_top_left" + suffix][index]
        item["caption"] = "" if drop_caption else self._captions[index]
        item["index"] = index
        item["extras"] = {column: values[index] for column, values in self._extras.items()}
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(folder={str(self.folder)!r}, source={self.source!r}, rows={len(self)}, "
                f"random_flip={self.random_flip}, prompts={self.manifest['num_prompts']})")
