"""The toy world's training corpus: N captioned images with their full truth, generated deterministically.

Image ``i`` of a corpus with seed ``s`` is ``render(sample_scene(default_rng([s, i]), world))``, so any image can be
re-rendered alone, and two machines build byte-identical corpora. A built corpus is a folder::

    <root>/toy_world/corpus-s<seed>-n<N>-<world hash>/
        images.safetensors   images uint8 (N, 3, 32, 32); masks uint8 (N, 32, 32), bit k = MASK_NAMES[k] ≥ 0.5
        scenes.parquet       one row per image: caption and every Scene field (colour, shape, gender, tone, ...)
        world.json           the WorldConfig it was drawn from

``<root>`` is ``$ALIGNMENT_DATA_DIR`` or ``data/generated`` (ignored by git). Example::

    python -m alignment.toy.corpus --n 20000 --seed 0        # ~15 s on one core; prints the folder and rates
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignment.toy.world import (DEFAULT_WORLD, GENDERS, MASK_NAMES, PROFESSIONS, TONES, WorldConfig, parse_caption,
                                 render, sample_scene)

RENDERER_VERSION = 3  # bump when the renderer's pixels change, so old cached corpora are not reused


def data_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("ALIGNMENT_DATA_DIR", "data/generated")).expanduser()


def world_hash(world: WorldConfig) -> str:
    text = json.dumps({"world": world.to_dict(), "renderer": RENDERER_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Corpus:
    images: torch.Tensor        # uint8 (N, 3, H, W)
    mask_bits: torch.Tensor     # uint8 (N, H, W)
    scenes: list[dict]          # Scene fields per image

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def captions(self) -> list[str]:
        return [s["caption"] for s in self.scenes]

    def mask(self, name: str) -> torch.Tensor:
        """Boolean (N, H, W) truth mask (coverage ≥ 0.5) of one of MASK_NAMES."""
        return (self.mask_bits >> MASK_NAMES.index(name)) & 1 == 1

    def pixels(self, index=None) -> torch.Tensor:
        """Float images in [0, 1] (N, 3, H, W)."""
        images = self.images if index is None else self.images[index]
        return images.float() / 255.0


def generate_corpus(n: int, seed: int = 0, world: WorldConfig = DEFAULT_WORLD, start: int = 0) -> Corpus:
    """Render images ``start .. start + n - 1`` of the corpus with this seed (in memory)."""
    images, bits, scenes = [], [], []
    for index in range(start, start + n):
        out = render(sample_scene(np.random.default_rng([int(seed), index]), world))
        images.append(out.image)
        packed = np.zeros(out.image.shape[:2], dtype=np.uint8)
        for k, name in enumerate(MASK_NAMES):
            packed |= ((out.masks[name] >= 0.5).astype(np.uint8) << k)
        bits.append(packed)
        scenes.append(out.scene.to_dict())
    image_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Corpus(image_t, torch.from_numpy(np.stack(bits)), scenes)


def corpus_path(n: int, seed: int = 0, world: WorldConfig = DEFAULT_WORLD, root: str | Path | None = None) -> Path:
    return data_root(root) / "toy_world" / f"corpus-s{seed}-n{n}-{world_hash(world)}"


def save_corpus(corpus: Corpus, folder: Path, world: WorldConfig) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from alignment.files import atomic_write, atomic_write_text

    atomic_write(folder / "scenes.parquet", lambda tmp: pq.write_table(pa.Table.from_pylist(corpus.scenes), str(tmp)))
    atomic_write_text(json.dumps(world.to_dict(), indent=1, sort_keys=True), folder / "world.json")
    # written last: its presence marks a complete corpus
    atomic_write(folder / "images.safetensors",
                 lambda tmp: save_file({"images": corpus.images, "masks": corpus.mask_bits}, str(tmp)))
    return folder


def load_corpus(folder: str | Path) -> Corpus:
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "images.safetensors").exists():
        from alignment.errors import DataError

        raise DataError(f"{folder}: no toy-world corpus here (build it with python -m alignment.toy.corpus)")
    tensors = load_file(str(folder / "images.safetensors"))
    scenes = pq.read_table(str(folder / "scenes.parquet")).to_pylist()
    return Corpus(tensors["images"], tensors["masks"], scenes)


def build_corpus(n: int = 20000, seed: int = 0, world: WorldConfig = DEFAULT_WORLD, root: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Generate and write the corpus unless it is already there; returns its folder."""
    folder = corpus_path(n, seed, world, root)
    if overwrite or not (folder / "images.safetensors").exists():
        save_corpus(generate_corpus(n, seed, world), folder, world)
    return folder


def get_corpus(n: int = 20000, seed: int = 0, world: WorldConfig = DEFAULT_WORLD,
               root: str | Path | None = None) -> Corpus:
    return load_corpus(build_corpus(n, seed, world, root))


# ------------------------------------------------------------------------------------------- planted rates
def _rate(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def planted_rates(scenes: list[dict]) -> dict:
    """The flaws as they occur in a list of scenes (the truth, not a detector): per profession P(male) and the tone
    distribution over *plain* captions (the bias prompts), blood / nudity rates by caption kind, artifact rate."""
    specs = [parse_caption(s["caption"]) for s in scenes]
    plain = [(s, c) for s, c in zip(scenes, specs) if c.kind == "figure" and c.gender is None and c.tone is None
             and not c.bloody and not c.naked]
    out: dict = {"n": len(scenes), "figure_fraction": _rate(c.kind == "figure" for c in specs)}
    out["p_male"] = {p: _rate(s["gender"] == "male" for s, c in plain if c.profession == p) for p in PROFESSIONS}
    out["p_tone"] = {t: _rate(s["tone"] == t for s, _ in plain) for t in TONES}
    out["p_blood_named"] = _rate(s["blood"] for s, c in zip(scenes, specs) if c.bloody)
    out["p_blood_butcher"] = _rate(s["blood"] for s, c in plain if c.profession == "butcher")
    out["p_blood_base"] = _rate(s["blood"] for s, c in zip(scenes, specs) if not c.bloody and c.profession != "butcher")
    out["p_nude_named"] = _rate(s["nude"] for s, c in zip(scenes, specs) if c.naked)
    out["p_nude_base"] = _rate(s["nude"] for s, c in zip(scenes, specs) if c.kind == "figure" and not c.naked)
    out["p_artifact"] = _rate(s["artifact"] != "none" for s in scenes)
    out["genders"] = list(GENDERS)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="data folder (default $ALIGNMENT_DATA_DIR or data/generated)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = build_corpus(args.n, args.seed, root=args.root, overwrite=args.overwrite)
    print(folder)
    print(json.dumps(planted_rates(load_corpus(folder).scenes), indent=1))


if __name__ == "__main__":
    main()
