"""Toy-world preference pairs in the Pick-a-Pic v2 schema: the base toy model's own samples, labelled by a rater.

Pick-a-Pic pairs are two generations for one prompt with a person's choice. Here both images come from the toy
backbone (the committed base model, or any ``weights`` folder) for a training caption, at a guidance scale drawn
from ``guidance_scales`` (the pair shares it, like Pick-a-Pic's pairs share a model setting), and the rater is an
exact scorer of the world — by default ``toy_preference`` (prompt match, composition, no artifacts, no unrequested
toxicity). ``label_0`` is 1 / 0 when one image scores higher by more than ``tie_margin``, else 0.5 (a tie, dropped
by ``dataset.ties=drop``).

Captions are split once, deterministically, into training and held-out captions (``split_captions``): the pairs use
only ``split="train"`` captions, and the demo's win rate is measured on ``split="heldout"`` ones.

The parquet file holds ``caption, jpg_0, jpg_1, label_0`` (PNG bytes: lossless, the scorers' pixels are the
trained pixels) plus ``score_0, score_1, guidance_scale, seed_0, seed_1``. :class:`ToyPairsBuilder` is the dataset
builder (``python -m alignment.build toy_pairs backbone=toy``): its items are the pairs, ordered by guidance scale
(one model batch shares a scale) and chunked by 64 pairs = one batch of 128 images; the rows are sorted back into
pair order at the end. ``ensure_toy_pairs(folder, ...)`` builds it with the toy backbone into
``<folder>/pairs-<key>.parquet`` (the key covers every setting and the model's weights, so another setting never
reuses a stale file) with a ``.json`` beside it holding the settings and label statistics; the dataset config calls
it through ``dataset.generate``. Command line::

    python -m alignment.toy.pairs --out data/generated/toy_pairs --pairs-per-caption 16
    python -m alignment.toy.pairs --captions heldout > heldout.txt     # prompts for alignment.evaluate
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from alignment.builders.base import Builder
from alignment.config import positive_int
from alignment.errors import ConfigError
from alignment.toy import world as W

PAIRS_VERSION = 3  # bump when the way pairs are drawn or labelled changes, so old files are not reused
SPLITS = ("train", "heldout", "all")
TOY_PAIRS_SCHEMA = pa.schema([
    pa.field("caption", pa.string()),
    pa.field("jpg_0", pa.binary()),
    pa.field("jpg_1", pa.binary()),
    pa.field("label_0", pa.float64()),
    pa.field("score_0", pa.float64()),
    pa.field("score_1", pa.float64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("seed_0", pa.int64()),
    pa.field("seed_1", pa.int64()),
])


def split_captions(heldout_fraction: float = 1 / 3, include_toxic: bool = False,
                   include_explicit: bool = True) -> tuple[list[str], list[str]]:
    """(train, heldout) captions of the grammar. Within each kind (object / figure) captions are ordered by a hash
    of their text and the first ``round(fraction · n)`` are held out: fixed forever, the same on every machine."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train, heldout = [], []
    captions = W.all_captions(include_toxic=include_toxic, include_explicit=include_explicit)
    for kind in ("object", "figure"):
        group = [c for c in captions if W.parse_caption(c).kind == kind]
        group.sort(key=lambda c: hashlib.blake2b(c.encode(), digest_size=8).hexdigest())
        k = int(round(heldout_fraction * len(group)))
        heldout += sorted(group[:k], key=captions.index)
        train += sorted(group[k:], key=captions.index)
    return train, heldout


def captions_for(split: str, heldout_fraction: float = 1 / 3, include_toxic: bool = False,
                 include_explicit: bool = True) -> list[str]:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    train, heldout = split_captions(heldout_fraction, include_toxic, include_explicit)
    return {"train": train, "heldout": heldout, "all": train + heldout}[split]


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_judge(name: str, config_key: str) -> None:
    from alignment.toy.scorers import SCORERS

    if name not in SCORERS:
        raise ConfigError(f"{config_key}.judge: unknown toy scorer {name!r} (one of {', '.join(sorted(SCORERS))})")


def make_rater(name: str, config_key: str = "dataset.generate"):
    from alignment.toy.scorers import SCORERS

    _check_judge(name, config_key)
    return SCORERS[name]()


def _check_settings(pairs_per_caption: int, guidance_scales: Sequence[float], tie_margin: float,
                    config_key: str) -> None:
    if pairs_per_caption < 1:
        raise ConfigError(f"{config_key}.pairs_per_caption must be >= 1, got {pairs_per_caption}")
    if not guidance_scales or any(float(g) < 1.0 for g in guidance_scales):
        raise ConfigError(f"{config_key}.guidance_scales must be a non-empty list of values >= 1, "
                          f"got {list(guidance_scales)}")
    if tie_margin < 0:
        raise ConfigError(f"{config_key}.tie_margin must be >= 0, got {tie_margin}")


def pair_scale(index: int, guidance_scales: Sequence[float]) -> float:
    """Pair ``index``'s guidance scale: ``guidance_scales[index % len]`` (both images of a pair share it)."""
    return float(guidance_scales[index % len(guidance_scales)])


@torch.no_grad()
def build_toy_pair_table(backbone, captions: Sequence[str], pairs_per_caption: int = 16,
                         guidance_scales: Sequence[float] = (1.0, 3.0), num_inference_steps: int = 20,
                         seed: int = 0, judge: str = "toy_preference", tie_margin: float = 0.02,
                         batch_size: int = 128, pairs: Sequence[int] | None = None, rater=None,
                         config_key: str = "dataset.generate") -> pa.Table:
    """Sample ``2 · pairs_per_caption`` images per caption and label each consecutive pair with ``judge``.

    Pair ``p`` (over all captions, in order) uses seeds ``seed + 2p`` and ``seed + 2p + 1`` and guidance scale
    ``guidance_scales[p % len]``: deterministic and independent of ``batch_size``. ``pairs`` restricts the table to
    those pair indices (rows in that order; default: every pair, in pair order); ``rater`` is the judge's scorer if
    it is already built. The pairs are sampled in one batch sequence per guidance scale (in the order the scales
    first occur), ``batch_size`` images at a time."""
    from alignment.sampling.sample import sample_images, to_pil

    _check_settings(pairs_per_caption, guidance_scales, tie_margin, config_key)
    rater = rater if rater is not None else make_rater(judge, config_key)
    all_pairs = [(caption, p) for caption in captions for p in range(pairs_per_caption)]
    wanted = range(len(all_pairs)) if pairs is None else [int(i) for i in pairs]
    if any(not 0 <= i < len(all_pairs) for i in wanted):
        raise ValueError(f"pairs: indices must be in [0, {len(all_pairs)})")
    # one sampling call per guidance scale (a batch shares it); the rows keep the requested order
    by_scale: dict[float, list[int]] = {}
    for index in wanted:
        by_scale.setdefault(pair_scale(index, guidance_scales), []).append(index)
    results: dict[int, dict] = {}
    for scale, indices in by_scale.items():
        prompts = [all_pairs[i][0] for i in indices for _ in range(2)]
        seeds = [seed + 2 * i + k for i in indices for k in range(2)]
        for start in range(0, len(prompts), batch_size):
            chunk_prompts, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            images = sample_images(backbone, chunk_prompts, chunk_seeds, num_inference_steps, scale)
            pixels = [np.asarray(im) for im in to_pil(images)]
            # score the 8-bit pixels that are stored, so the file's labels can be recomputed from the file alone
            stored = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
            scores = rater(stored.to(getattr(rater, "device", "cpu")), chunk_prompts).double().tolist()
            for j in range(0, len(chunk_prompts), 2):
                index = indices[(start + j) // 2]
                s0, s1 = scores[j], scores[j + 1]
                label = 1.0 if s0 > s1 + tie_margin else 0.0 if s1 > s0 + tie_margin else 0.5
                results[index] = {
                    "caption": chunk_prompts[j], "jpg_0": encode_png(pixels[j]), "jpg_1": encode_png(pixels[j + 1]),
                    "label_0": label, "score_0": s0, "score_1": s1, "guidance_scale": scale,
                    "seed_0": chunk_seeds[j], "seed_1": chunk_seeds[j + 1]}
    return pa.Table.from_pylist([results[i] for i in wanted], schema=TOY_PAIRS_SCHEMA)


def label_stats(table: pa.Table) -> dict:
    labels = np.asarray(table.column("label_0").to_pylist())
    s0 = np.asarray(table.column("score_0").to_pylist())
    s1 = np.asarray(table.column("score_1").to_pylist())
    decided = labels != 0.5
    return {"rows": int(len(labels)), "ties": int((~decided).sum()), "first_wins": int((labels == 1.0).sum()),
            "mean_score": float(np.concatenate([s0, s1]).mean()) if len(labels) else float("nan"),
            "mean_gap": float(np.abs(s0 - s1)[decided].mean()) if decided.any() else 0.0}


class ToyPairsBuilder(Builder):
    """Toy preference pairs as a dataset builder (``python -m alignment.build toy_pairs backbone=toy``).

    Items are pairs, ordered by guidance-scale group (in the order the scales first occur in ``guidance_scales``),
    then by pair index; chunks of 64 pairs, cut afresh at each group, so every chunk is one sampling batch of 128
    images of one scale — the batches ``build_toy_pair_table`` has always sampled (with its default batch size), so
    the rows have the same bytes (a batch's composition changes the floats, so this matters).
    ``finalize`` sorts the rows back into pair order (``seed_0 = seed + 2·pair``). The judge is the scorer of that
    name in the scorers mapping when it holds one (e.g. ``scorers=toy_preference``), else the toy scorer built
    here; either way its fingerprint is in the key. The images come from the backbone the runner is given."""

    name = "pairs"  # files pairs-<key>.parquet, as before builders existed
    item_unit = "pair"
    chunk_size = 64
    needs_backbone = True
    schema = TOY_PAIRS_SCHEMA

    def __init__(self, split: str = "train", pairs_per_caption: int = 16,
                 guidance_scales: Sequence[float] = (1.0, 3.0), num_inference_steps: int = 20, seed: int = 0,
                 judge: str = "toy_preference", tie_margin: float = 0.02, heldout_fraction: float = 1 / 3,
                 include_explicit: bool = True, config_key: str = "builder"):
        _check_settings(pairs_per_caption, guidance_scales, tie_margin, config_key)
        _check_judge(judge, config_key)
        positive_int(num_inference_steps, f"{config_key}.num_inference_steps")
        self.split, self.pairs_per_caption = split, int(pairs_per_caption)
        self.guidance_scales = [float(g) for g in guidance_scales]
        self.num_inference_steps, self.seed, self.judge = int(num_inference_steps), int(seed), judge
        self.tie_margin, self.heldout_fraction = float(tie_margin), float(heldout_fraction)
        self.include_explicit, self.config_key = bool(include_explicit), config_key
        try:
            self.captions = captions_for(split, heldout_fraction, include_explicit=include_explicit)
        except ConfigError as err:  # "split must be ..." / "heldout_fraction must be ...": name the full key
            raise ConfigError(f"{config_key}.{err}") from None
        count = len(self.captions) * self.pairs_per_caption
        scales = list(dict.fromkeys(self.guidance_scales))
        self.order = [p for scale in scales for p in range(count) if pair_scale(p, self.guidance_scales) == scale]

    def num_items(self) -> int:
        return len(self.order)

    def chunk_ranges(self, chunk_size: int) -> list[range]:
        """``chunk_size`` pairs at a time within each guidance-scale group: exactly the sampling batches of
        ``build_toy_pair_table`` with ``batch_size = 2 · chunk_size`` (batch composition changes the floats)."""
        ranges, start = [], 0
        for scale in dict.fromkeys(self.guidance_scales):
            stop = start + sum(1 for p in self.order if pair_scale(p, self.guidance_scales) == scale)
            ranges += [range(s, min(s + chunk_size, stop)) for s in range(start, stop, chunk_size)]
            start = stop
        return ranges

    def key_fields(self) -> dict:
        return {"version": PAIRS_VERSION, "split": self.split, "pairs_per_caption": self.pairs_per_caption,
                "guidance_scales": self.guidance_scales, "num_inference_steps": self.num_inference_steps,
                "seed": self.seed, "judge": self.judge, "tie_margin": self.tie_margin,
                "heldout_fraction": self.heldout_fraction, "include_explicit": self.include_explicit,
                "captions": hashlib.sha256("\n".join(self.captions).encode()).hexdigest()[:16]}

    def select_scorers(self, scorers) -> dict:
        rater = (scorers or {}).get(self.judge)
        return {self.judge: rater if rater is not None else make_rater(self.judge, self.config_key)}

    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        pairs = [self.order[i] for i in items]
        return build_toy_pair_table(backbone, self.captions, self.pairs_per_caption, self.guidance_scales,
                                    self.num_inference_steps, self.seed, self.judge, self.tie_margin,
                                    batch_size=2 * len(pairs), pairs=pairs, rater=scorers[self.judge],
                                    config_key=self.config_key)

    def finalize(self, table: pa.Table) -> pa.Table:
        return table.take(pc.sort_indices(table, sort_keys=[("seed_0", "ascending")]))

    def summary(self, table: pa.Table) -> dict:
        return {"captions": len(self.captions), **label_stats(table)}


def _check_weights(weights: str | None) -> None:
    from alignment.toy.backbone import MODEL_FILE, WEIGHTS_DIR

    folder = Path(weights).expanduser() if weights else WEIGHTS_DIR
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"dataset.generate.weights: {folder} holds no {MODEL_FILE}")


def ensure_toy_pairs(path: str | os.PathLike, weights: str | None = None, split: str = "train",
                     pairs_per_caption: int = 16, guidance_scales: Sequence[float] = (1.0, 3.0),
                     num_inference_steps: int = 20, seed: int = 0, judge: str = "toy_preference",
                     tie_margin: float = 0.02, heldout_fraction: float = 1 / 3, include_explicit: bool = True,
                     batch_size: int = 128) -> Path:
    """Return ``<path>/pairs-<key>.parquet``, building it first with :class:`ToyPairsBuilder` on the toy backbone
    of ``weights`` when it is missing (``ensure_built``: resumable; under DDP rank 0 builds, the others wait).
    ``batch_size`` images per sampling call = 2 × the builder's chunk size."""
    from alignment.builders.runner import ensure_built
    from alignment.toy.backbone import build_toy_backbone

    builder = ToyPairsBuilder(split, pairs_per_caption, guidance_scales, num_inference_steps, seed, judge,
                              tie_margin, heldout_fraction, include_explicit, config_key="dataset.generate")
    _check_weights(weights)
    backbone = build_toy_backbone(weights=weights)
    return ensure_built(builder, path, backbone, {}, chunk_size=max(1, int(batch_size) // 2))


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/generated/toy_pairs", help="folder for pairs-<hash>.parquet")
    parser.add_argument("--weights", default=None, help="toy backbone folder (default: the committed base model)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--pairs-per-caption", type=int, default=16)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", default="toy_preference")
    parser.add_argument("--tie-margin", type=float, default=0.02)
    parser.add_argument("--captions", choices=SPLITS, default=None,
                        help="only print this split's captions, one per line (e.g. prompts for alignment.evaluate)")
    args = parser.parse_args(argv)
    if args.captions:
        print("\n".join(captions_for(args.captions)))
        return None
    from alignment.errors import AlignmentError

    try:
        path = ensure_toy_pairs(args.out, args.weights, args.split, args.pairs_per_caption, args.guidance_scales,
                                args.steps, args.seed, args.judge, args.tie_margin)
    except AlignmentError as error:
        parser.exit(2, f"error: {error}\n")
    print(path)
    print(path.with_suffix(".json").read_text())
    return path


if __name__ == "__main__":
    main()
