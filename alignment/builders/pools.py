"""Sample pools: preference pairs made of the backbone's own samples, N images per prompt.

For every prompt of a prompt file, the backbone being aligned samples a pool of ``num_images`` (N) images, image
``j`` of prompt ``i`` from seed ``derive_seed(seed, i, j)``. The pool then becomes preference pairs by one of two
rules (``pairing``):

- ``"ranked"`` (HG-DPO): the scorer ``rank_by`` scores all N images; the best one is the winner and the one at
  position ``loser_rank`` of the descending order (default: the last, i.e. the worst) is the loser. One row per
  prompt, ``label_0 = 1.0``. Taking the two ends of the pool gives the widest score gap, the clearest difference
  the scorer can see, and both images are in the target model's own style, so the model learns what the scorer
  prefers rather than another model's look. Equal scores keep image order (the lower index ranks first).
- ``"consecutive"`` (BalancedDPO, prompt-only path): images ``(0, 1), (2, 3), ...`` of each pool become N / 2
  pairs, left unlabelled (``label_0 = 0.5``); a labeller decides them later by a majority vote of several scorers.
  No scorer is used here.

Images are stored as PNG (lossless), and scores are taken on the stored 8-bit pixels, so every score in the file can
be recomputed from the file alone. Each row also records the prompt's whole pool: its N seeds (``pool_seeds``) and,
for ``ranked``, its N scores in image order (``pool_scores``).

The file has the Pick-a-Pic v2 schema (``caption, jpg_0, jpg_1, label_0``) plus the columns of ``POOL_SCHEMA``, and
loads with :class:`alignment.data.pickapic.PreferencePairs`. Build it with the runner (resumable, sharded)::

    python -m alignment.build pools backbone=toy builder.prompts=prompts.txt builder.num_images=4 \\
        scorers=toy_colour builder.rank_by=toy_colour
    python -m alignment.build pools backbone=toy builder.prompts=prompts.txt builder.num_images=4 \\
        builder.pairing=consecutive

or through ``dataset=pools`` (``conf/dataset/pools.yaml``), which builds it before training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from alignment.builders.base import Builder
from alignment.config import integer, number, positive_int
from alignment.errors import ConfigError, DataError
from alignment.seeding import derive_seed

POOLS_VERSION = 1  # bump when the way pools are sampled, scored or paired changes, so old files are not reused
PAIRINGS: tuple[str, ...] = ("ranked", "consecutive")
POOL_SCHEMA = pa.schema([
    pa.field("caption", pa.string()),
    pa.field("jpg_0", pa.binary()),                  # PNG bytes, despite the Pick-a-Pic column name
    pa.field("jpg_1", pa.binary()),
    pa.field("label_0", pa.float64()),               # ranked: 1.0 (jpg_0 wins); consecutive: 0.5 (unlabelled)
    pa.field("seed_0", pa.int64()),
    pa.field("seed_1", pa.int64()),
    pa.field("prompt_index", pa.int64()),            # position of the caption in the prompt list
    pa.field("pool_seeds", pa.list_(pa.int64())),    # the N seeds of the prompt's pool, in image order
    pa.field("pool_scores", pa.list_(pa.float64())),  # ranked: the N scores in image order; consecutive: []
    pa.field("score_0", pa.float64()),               # ranked: the pair's scores; consecutive: NaN
    pa.field("score_1", pa.float64()),
])


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_to_tensor(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> one (B, 3, H, W) float tensor in [0, 1]: what a scorer sees of the stored images."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0


def prompts_hash(prompts: Sequence[str]) -> str:
    """A short hash of the prompt list (content and order), for the file's key."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def read_pool_prompts(prompts, max_prompts: int | None, config_key: str) -> list[str]:
    """The prompts of the file ``prompts`` (any format ``read_prompt_records`` reads), the first ``max_prompts``."""
    from alignment.data.prompts import read_prompt_records

    path = Path(os.fspath(prompts)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{config_key}.prompts: prompt file {path} does not exist")
    try:
        records = read_prompt_records(path)
    except DataError as err:
        raise DataError(f"{config_key}.prompts: {err}") from None
    texts = [record["prompt"] for record in records]
    return texts[:max_prompts] if max_prompts is not None else texts


class PoolBuilder(Builder):
    """Pairs from pools of the backbone's own samples (see the module docstring); items are prompts.

    Args:
        prompts: The prompt file (``.txt``, ``.jsonl``, ``.json``, ``.tsv``, ``.csv``, ``.parquet``).
        num_images: Images per prompt (N), at least 2 (even for ``consecutive``).
        pairing: ``"ranked"`` (HG-DPO: best vs ``loser_rank``, one row per prompt) or ``"consecutive"``
            (BalancedDPO: images ``(2k, 2k+1)``, N / 2 unlabelled rows per prompt).
        rank_by: The scorer that ranks a pool (a name in the ``scorers`` mapping); required for ``ranked``, unused
            for ``consecutive``.
        loser_rank: The loser's 0-based position in the descending order, in ``[1, N - 1]``; ``None``: ``N - 1``
            (the worst image). Unused for ``consecutive``.
        max_prompts: Use only the first prompts of the file; ``None``: all.
        seed: Image ``j`` of prompt ``i`` uses seed ``derive_seed(seed, i, j)``, whatever the batch or chunk size.
        num_inference_steps, guidance_scale, eta, negative_prompt, sampler: The sampler's settings
            (``alignment.sampling.sample.sample_images``; ``sampler`` is ``"ddim"`` or ``"dpmsolver"``, HG-DPO's
            DPMSolverMultistep; ``eta`` is DDIM's and must be 0 with ``dpmsolver``).
        batch_size: Images per sampling (and scoring) call within a chunk. A batch's composition can change the
            floats, so it is part of the key, like the runner's ``chunk_size`` (prompts per chunk, default 8).
        config_key: The config key of this builder, for error messages (``builder``, ``dataset.generate``).
    """

    name = "pools"
    item_unit = "img"  # the progress bar counts images: units_per_item = num_images per prompt
    chunk_size = 8
    needs_backbone = True
    schema = POOL_SCHEMA

    def __init__(self, prompts: str | os.PathLike | None = None, num_images: int = 20, pairing: str = "ranked",
                 rank_by: str | None = None, loser_rank: int | None = None, max_prompts: int | None = None,
                 seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 5.0, eta: float = 0.0,
                 negative_prompt: str = "", sampler: str = "ddim", batch_size: int = 32,
                 config_key: str = "builder"):
        from alignment.sampling.sample import check_sampler

        key = config_key
        if prompts is None or str(prompts).strip() == "":  # first: the one key every config must set
            raise ConfigError(f"{key}.prompts: set the prompt file to sample pools for "
                              f"({key}.prompts=<.txt/.jsonl/.json/.tsv/.csv/.parquet>)")
        # pool and pairing
        num_images = integer(num_images, f"{key}.num_images")
        if num_images < 2:
            raise ConfigError(f"{key}.num_images must be >= 2 (a pool makes pairs), got {num_images}")
        if pairing not in PAIRINGS:
            raise ConfigError(f"{key}.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if pairing == "ranked":
            if not isinstance(rank_by, str) or not rank_by.strip():
                raise ConfigError(f"{key}.rank_by: ranked pairing needs the scorer that ranks each pool "
                                  f"({key}.rank_by=NAME with scorers=[NAME], or {key}.pairing=consecutive)")
            if loser_rank is None:
                loser_rank = num_images - 1
            loser_rank = integer(loser_rank, f"{key}.loser_rank")
            if not 1 <= loser_rank <= num_images - 1:
                raise ConfigError(f"{key}.loser_rank must be in [1, num_images - 1] = [1, {num_images - 1}] "
                                  f"(0 is the winner; num_images is {num_images}), got {loser_rank}")
        else:
            if num_images % 2:
                raise ConfigError(f"{key}.num_images must be even with pairing=consecutive "
                                  f"(images 2k and 2k+1 make a pair), got {num_images}")
            rank_by, loser_rank = None, None  # unused: no scorer, every image is in a pair
        # sampler
        seed = integer(seed, f"{key}.seed")
        num_inference_steps = positive_int(num_inference_steps, f"{key}.num_inference_steps")
        guidance_scale = number(guidance_scale, f"{key}.guidance_scale")
        if guidance_scale < 1.0:
            raise ConfigError(f"{key}.guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
        eta = number(eta, f"{key}.eta")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"{key}.eta must be in [0, 1], got {eta}")
        if not isinstance(negative_prompt, str):
            raise ConfigError(f"{key}.negative_prompt must be a string, got {negative_prompt!r}")
        sampler = check_sampler(sampler, f"{key}.sampler")
        if sampler != "ddim" and eta != 0.0:
            raise ConfigError(f"{key}.eta: eta is DDIM's, it must be 0 with {key}.sampler={sampler}, got {eta}")
        batch_size = positive_int(batch_size, f"{key}.batch_size")
        if max_prompts is not None:
            max_prompts = positive_int(max_prompts, f"{key}.max_prompts")
        # prompts last: the only check that reads a file
        self.prompts = read_pool_prompts(prompts, max_prompts, key)

        self.num_images, self.pairing, self.rank_by, self.loser_rank = num_images, pairing, rank_by, loser_rank
        self.max_prompts, self.seed = max_prompts, seed
        self.num_inference_steps, self.guidance_scale, self.eta = num_inference_steps, guidance_scale, eta
        self.negative_prompt, self.sampler, self.batch_size = negative_prompt, sampler, batch_size
        self.config_key = config_key
        self.scorer_names = (rank_by,) if pairing == "ranked" else ()
        self.units_per_item = num_images  # the runner's progress bar: images, not prompts

    # ------------------------------------------------------------------------------------------------ plan
    def num_items(self) -> int:
        return len(self.prompts)

    def key_fields(self) -> dict:
        return {"version": POOLS_VERSION, "prompts": prompts_hash(self.prompts), "num_prompts": len(self.prompts),
                "num_images": self.num_images, "pairing": self.pairing, "rank_by": self.rank_by,
                "loser_rank": self.loser_rank, "seed": self.seed, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "eta": self.eta, "negative_prompt": self.negative_prompt,
                # the field kept the sampler's old key name, so DDIM pools built before the rename are reused
                "scheduler": self.sampler, "batch_size": self.batch_size}

    def check_scorer_names(self, configured) -> None:
        """``rank_by`` (ranked pairing) names one of the ``configured`` scorer names: from the config alone, so an
        entry point checks it before any model loads (``alignment.builders.runner.check_scorer_config``)."""
        if self.pairing != "ranked" or self.rank_by in configured:
            return
        names = ", ".join(sorted(str(n) for n in configured)) or "none"
        raise ConfigError(f"scorers: {self.config_key}.rank_by is {self.rank_by!r}, which is not a configured "
                          f"scorer (add it: scorers=[{self.rank_by}]; configured: {names})")

    def select_scorers(self, scorers: Mapping | None) -> dict:
        if self.pairing != "ranked":
            return {}
        scorers = dict(scorers or {})
        self.check_scorer_names(scorers)
        return {self.rank_by: scorers[self.rank_by]}

    def image_seeds(self, prompt_index: int) -> list[int]:
        """The N seeds of prompt ``prompt_index``'s pool, in image order."""
        return [derive_seed(self.seed, prompt_index, j) for j in range(self.num_images)]

    # ------------------------------------------------------------------------------------------------ build
    def sample_pixels(self, backbone, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """One image per (prompt, seed) as (H, W, 3) uint8 arrays: the stored pixels. Sampled ``batch_size``
        images per call, in order."""
        from alignment.sampling.sample import sample_images, to_pil

        pixels = []
        for start in range(0, len(prompts), self.batch_size):
            images = sample_images(backbone, prompts[start:start + self.batch_size],
                                   seeds[start:start + self.batch_size], self.num_inference_steps,
                                   self.guidance_scale, eta=self.eta, negative_prompt=self.negative_prompt,
                                   sampler=self.sampler)
            pixels += [np.asarray(image) for image in to_pil(images)]
        return pixels

    def score_pixels(self, scorer, pixels: list[np.ndarray], prompts: list[str]) -> list[float]:
        """The scores of the stored 8-bit pixels, ``batch_size`` images per call, in order."""
        device = getattr(scorer, "device", torch.device("cpu"))
        dtype = getattr(scorer, "dtype", torch.float32)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            images = pixels_to_tensor(pixels[start:start + self.batch_size]).to(device, dtype)
            scores += scorer(images, prompts[start:start + self.batch_size]).double().cpu().tolist()
        return scores

    @torch.no_grad()
    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        items = list(items)
        n = self.num_images
        prompts = [self.prompts[i] for i in items for _ in range(n)]
        seeds = [s for i in items for s in self.image_seeds(i)]
        pixels = self.sample_pixels(backbone, prompts, seeds)
        scores = self.score_pixels(scorers[self.rank_by], pixels, prompts) if self.pairing == "ranked" else None
        rows = []
        for position, index in enumerate(items):
            pool = slice(position * n, (position + 1) * n)
            pool_pixels, pool_seeds = pixels[pool], seeds[pool]
            if self.pairing == "ranked":
                rows.append(self._ranked_row(index, pool_pixels, pool_seeds, scores[pool]))
            else:
                rows += self._consecutive_rows(index, pool_pixels, pool_seeds)
        return pa.Table.from_pylist(rows, schema=POOL_SCHEMA)

    def _ranked_row(self, index: int, pixels: list[np.ndarray], seeds: list[int], scores: list[float]) -> dict:
        """Best image vs the image at ``loser_rank`` of the descending order (a stable sort: ties keep image
        order)."""
        if not all(math.isfinite(s) for s in scores):
            raise DataError(f"scorers.{self.rank_by}: non-finite score for prompt {index} "
                            f"({self.prompts[index]!r}): {scores}")
        order = sorted(range(len(scores)), key=lambda j: scores[j], reverse=True)  # reverse keeps ties stable
        winner, loser = order[0], order[self.loser_rank]
        return {"caption": self.prompts[index], "jpg_0": encode_png(pixels[winner]),
                "jpg_1": encode_png(pixels[loser]), "label_0": 1.0, "seed_0": seeds[winner], "seed_1": seeds[loser],
                "prompt_index": index, "pool_seeds": seeds, "pool_scores": scores,
                "score_0": scores[winner], "score_1": scores[loser]}

    def _consecutive_rows(self, index: int, pixels: list[np.ndarray], seeds: list[int]) -> list[dict]:
        """Images (0, 1), (2, 3), ... as unlabelled pairs."""
        return [{"caption": self.prompts[index], "jpg_0": encode_png(pixels[j]), "jpg_1": encode_png(pixels[j + 1]),
                 "label_0": 0.5, "seed_0": seeds[j], "seed_1": seeds[j + 1], "prompt_index": index,
                 "pool_seeds": seeds, "pool_scores": [], "score_0": math.nan, "score_1": math.nan}
                for j in range(0, len(pixels), 2)]

    # ------------------------------------------------------------------------------------------------ summary
    def summary(self, table: pa.Table) -> dict:
        stats = {"prompts": len(self.prompts), "rows": table.num_rows, "pairing": self.pairing,
                 "num_images": self.num_images}
        if self.pairing == "ranked" and table.num_rows:
            winner = np.asarray(table.column("score_0").to_pylist(), dtype=np.float64)
            loser = np.asarray(table.column("score_1").to_pylist(), dtype=np.float64)
            gap = winner - loser
            stats.update({"rank_by": self.rank_by, "loser_rank": self.loser_rank,
                          "mean_winner_score": float(winner.mean()), "mean_loser_score": float(loser.mean()),
                          "mean_gap": float(gap.mean()), "min_gap": float(gap.min()),
                          "zero_gap_rows": int((gap == 0).sum())})
        return stats
