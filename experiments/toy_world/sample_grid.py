"""A PNG grid of the toy backbone's samples (one row per caption, one column per seed) and the scores behind it.

    python experiments/toy_world/sample_grid.py                                   # committed weights
    python experiments/toy_world/sample_grid.py --weights outputs/toy_pretrain/export --out /tmp/grid.png
    python experiments/toy_world/sample_grid.py --random-init --out /tmp/random.png

Writes ``--out`` (default experiments/toy_world/base_samples.png) and prints the exact scorers' summary
(alignment.toy.probe.score_images) of the images in the grid as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from alignment.toy import world as W  # noqa: E402

CAPTIONS = [W.object_caption(c, s) for s in W.SHAPES for c in W.COLOURS] + \
    [W.figure_caption(p) for p in W.PROFESSIONS] + \
    [W.figure_caption("doctor", gender="female"), W.figure_caption("nurse", gender="male"),
     W.figure_caption("teacher", tone="dark"), W.figure_caption("butcher", bloody=True),
     W.figure_caption("doctor", naked=True), W.object_caption("blue", "circle", bloody=True)]


def main(argv=None) -> None:
    from PIL import Image, ImageDraw

    from alignment.sampling.sample import sample_images, to_pil
    from alignment.toy.backbone import build_toy_backbone
    from alignment.toy.probe import score_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="folder with config.json + model.safetensors")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "base_samples.png"))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--scale", type=int, default=2, help="pixel magnification of the grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backbone = build_toy_backbone(weights=args.weights, random_init=args.random_init)
    prompts = [c for c in CAPTIONS for _ in range(args.seeds)]
    seeds = [k for _ in CAPTIONS for k in range(args.seeds)]
    images = torch.cat([sample_images(backbone, prompts[i:i + 64], seeds[i:i + 64], args.steps, args.guidance_scale)
                        for i in range(0, len(prompts), 64)])
    side, label_w = W.SIZE * args.scale, 230
    grid = Image.new("RGB", (label_w + side * args.seeds, side * len(CAPTIONS)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(to_pil(images)):
        row, col = divmod(i, args.seeds)
        grid.paste(img.resize((side, side), Image.NEAREST), (label_w + col * side, row * side))
        if col == 0:
            draw.text((4, row * side + side // 2 - 6), CAPTIONS[row], fill="black")
    grid.save(args.out)
    summary = score_images(images, prompts)
    summary.update({"guidance_scale": args.guidance_scale, "steps": args.steps, "out": args.out})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
