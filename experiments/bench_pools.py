"""Speed of the HG-DPO sample-pool builder against diffusers' stock StableDiffusionPipeline, side by side in one run.

    python experiments/bench_pools.py cpu --threads 1   # tiny backbone on the CPU (what `make bench` runs)
    python experiments/bench_pools.py gpu               # SD 1.5 architecture @512, random weights, one GPU, bf16

Both sides make the same images: the same backbone modules (UNet, VAE, text encoder, tokenizer), the same sampler
(DPMSolverMultistep, DPM-Solver++ order 2, or DDIM) with the same config, the same prompts in the same batches, the
same steps and CFG scale, and the same start noise (image j of prompt i from ``derive_seed(seed, i, j)``, drawn by
``torch.Generator().manual_seed``). The images are compared (max |Δ| of the 8-bit pixels) and printed.

  A   the real ``PoolBuilder`` (pairing=ranked, PickScore-architecture scorer) run by the builder runner
      (``alignment.builders.runner.build``) into a fresh temp folder, models already built. Timed from its own
      work: the seconds spent in ``PoolBuilder.sample_pixels`` (sampling, decoding, 8-bit pixels) and in
      ``PoolBuilder.score_pixels`` (scoring those pixels), measured by wrapping the two methods of the instance the
      runner calls; the whole ``build()`` call (key with the weights' hash, PNG encoding of winners and losers,
      parquet chunk, merge) is printed too, for reference.
  B   ``StableDiffusionPipeline`` (safety checker off, output_type="pil", ``latents=`` from the same seeds), one
      call per batch, then ``np.asarray`` of each image: what a user would write to get the pool's pixels.
  B'  B plus the same scoring as the builder (the 8-bit pixels as float [0, 1] tensors, the same scorer, the same
      batches): the like-for-like comparison for A's sampling + scoring.

A and B alternate (A, B, A, B, ...) after one warm-up run of each; medians over the repeats. Target: builder /
pipeline images/s >= 1.0x (a user would otherwise write the pipeline loop).
The GPU suite runs on the CPU at small size for testing: ``gpu --device cpu --scale small --resolution 64 --steps 2``.
At full size it needs ``alignment.fingerprint.hash_tensors`` to handle tensors of more than 2^24 elements (CLIP's token
embedding): its float32 ``linspace`` sample index can land one past the end (experiments/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT_WORDS = ["a red square on a white table", "a blue circle in the sky", "a green triangle on grass",
                "a purple star at night", "an orange cat on a sofa", "a yellow house by a lake",
                "a black dog in the snow", "a white boat on the sea"]
SCORER = "pickscore"


# ------------------------------------------------------------------------------------------------ the two sides
def stock_scheduler(backbone, sampler: str):
    """The sampler as a diffusers user builds it from the model's scheduler config (checked equal to the builder's
    ``make_sampler``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from alignment.sampling.sample import make_sampler

    config = backbone.sample_scheduler.config
    scheduler = (DDIMScheduler.from_config(config) if sampler == "ddim" else
                 DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2))
    ours = make_sampler(backbone, sampler)
    assert type(ours) is type(scheduler) and dict(ours.config) == dict(scheduler.config), "sampler configs differ"
    return scheduler


def stock_pipeline(backbone, sampler: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=stock_scheduler(backbone, sampler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_plan(prompts: list[str], num_images: int, seed: int) -> tuple[list[str], list[int]]:
    """Every image of the pools in the builder's order: prompt i repeated N times, seeds derive_seed(seed, i, j)."""
    from alignment.seeding import derive_seed

    captions = [p for p in prompts for _ in range(num_images)]
    seeds = [derive_seed(seed, i, j) for i in range(len(prompts)) for j in range(num_images)]
    return captions, seeds


def new_timing() -> dict:
    return {"sample_s": 0.0, "score_s": 0.0, "sample_cpu_s": 0.0, "score_cpu_s": 0.0, "pixels": [], "scores": []}


@contextmanager
def clock(timing: dict, what: str):
    """Add the wall seconds (``<what>_s``) and this process's CPU seconds (``<what>_cpu_s``) of the block. With one
    thread the CPU seconds are the work done, whatever other jobs run on the machine's other cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timing[f"{what}_s"] += time.perf_counter() - wall
    timing[f"{what}_cpu_s"] += time.process_time() - cpu


def run_builder(backbone, scorer, prompt_file: Path, workdir: Path, args) -> dict:
    """One real PoolBuilder build into a fresh folder; seconds in sample_pixels / score_pixels / build()."""
    from alignment.builders.pools import PoolBuilder
    from alignment.builders.runner import build

    builder = PoolBuilder(prompt_file, num_images=args.num_images, pairing="ranked", rank_by=SCORER, seed=args.seed,
                          num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
                          batch_size=args.batch_size)
    timing = new_timing()
    sample_pixels, score_pixels = builder.sample_pixels, builder.score_pixels

    def timed_sample(*a, **k):
        with clock(timing, "sample"):
            pixels = sample_pixels(*a, **k)  # returns host uint8 arrays: the device is synchronised by then
        timing["pixels"] += pixels
        return pixels

    def timed_score(*a, **k):
        with clock(timing, "score"):
            scores = score_pixels(*a, **k)  # .cpu().tolist(): synchronised
        timing["scores"] += scores
        return scores

    builder.sample_pixels, builder.score_pixels = timed_sample, timed_score
    out = Path(tempfile.mkdtemp(dir=workdir))
    timing.update(build_s=0.0, build_cpu_s=0.0)
    with clock(timing, "build"):
        result = build(builder, out, backbone, {SCORER: scorer}, shard=(0, 1), progress=False)
    assert result.complete and result.rows == len(builder.prompts), result
    return timing


def run_pipeline(pipe, backbone, scorer, captions: list[str], seeds: list[int], args) -> dict:
    """The same images with the stock pipeline, one call per batch of ``batch_size``; then the same scoring."""
    timing = new_timing()
    device, dtype = backbone.device, backbone.unet.dtype
    extra = {"eta": 0.0} if args.sampler == "ddim" else {}
    for start in range(0, len(captions), args.batch_size):
        prompts, batch_seeds = captions[start:start + args.batch_size], seeds[start:start + args.batch_size]
        with clock(timing, "sample"):
            latents = torch.stack([torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(s))
                                   for s in batch_seeds]).to(device, dtype)
            images = pipe(prompts, latents=latents, num_inference_steps=args.steps, guidance_scale=args.cfg,
                          height=backbone.resolution, width=backbone.resolution, output_type="pil", **extra).images
            pixels = [np.asarray(image) for image in images]
        with clock(timing, "score"), torch.no_grad():  # the builder's scoring: 8-bit pixels -> float [0, 1]
            tensor = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
            scores = scorer(tensor.to(scorer.device, scorer.dtype), prompts).double().cpu().tolist()
        timing["pixels"] += pixels
        timing["scores"] += scores
    return timing


# ------------------------------------------------------------------------------------------------ the comparison
def compare(backbone, scorer, args, title: str) -> dict:
    prompts = [PROMPT_WORDS[i % len(PROMPT_WORDS)] + ("" if i < len(PROMPT_WORDS) else f", view {i}")
               for i in range(args.prompts)]
    captions, seeds = image_plan(prompts, args.num_images, args.seed)
    count = len(captions)
    pipe = stock_pipeline(backbone, args.sampler)
    runs = {"builder": [], "pipeline": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prompt_file = workdir / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        checks = []
        for repeat in range(args.repeats + 1):  # the first round is the warm-up, not counted
            built = run_builder(backbone, scorer, prompt_file, workdir, args)
            stock = run_pipeline(pipe, backbone, scorer, captions, seeds, args)
            a, b = np.stack(built["pixels"]).astype(np.int16), np.stack(stock["pixels"]).astype(np.int16)
            assert a.shape == b.shape == (count, *a.shape[1:]), (a.shape, b.shape)
            checks.append((int(np.abs(a - b).max()), float((a != b).mean()),
                           float(np.max(np.abs(np.asarray(built["scores"]) - np.asarray(stock["scores"]))))))
            if repeat:
                runs["builder"].append({k: v for k, v in built.items() if k.endswith("_s")})
                runs["pipeline"].append({k: v for k, v in stock.items() if k.endswith("_s")})
                print(f"repeat {repeat}: builder sample {built['sample_s']:.3f} s + score {built['score_s']:.3f} s "
                      f"(build() {built['build_s']:.3f} s); pipeline {stock['sample_s']:.3f} s + score "
                      f"{stock['score_s']:.3f} s", flush=True)

    def median(side: str, *keys: str) -> float:
        return statistics.median(sum(run[k] for k in keys) for run in runs[side])

    res = {"images": count, "prompts": args.prompts, "num_images": args.num_images, "batch_size": args.batch_size,
           "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "repeats": args.repeats,
           "max_abs_pixel_diff": max(c[0] for c in checks), "pixels_differing": max(c[1] for c in checks),
           "max_abs_score_diff": max(c[2] for c in checks), "runs": runs}
    for clock_name, suffix in (("wall", "_s"), ("cpu", "_cpu_s")):
        res[clock_name] = {
            "builder_sample_s": median("builder", "sample" + suffix),
            "builder_sample_score_s": median("builder", "sample" + suffix, "score" + suffix),
            "builder_build_s": median("builder", "build" + suffix),
            "pipeline_sample_s": median("pipeline", "sample" + suffix),
            "pipeline_sample_score_s": median("pipeline", "sample" + suffix, "score" + suffix)}
        r = res[clock_name]
        r["ratio_sampling"] = r["pipeline_sample_s"] / r["builder_sample_s"]
        r["ratio_sample_score"] = r["pipeline_sample_score_s"] / r["builder_sample_score_s"]
        r["ratio_build"] = r["pipeline_sample_score_s"] / r["builder_build_s"]
        r["paired_ratios"] = [(p["sample" + suffix] + p["score" + suffix])
                              / (b["sample" + suffix] + b["score" + suffix])
                              for p, b in zip(runs["pipeline"], runs["builder"])]

    def rate(seconds: float) -> str:
        return f"{count / seconds:.2f}"

    print(f"\n{title}: {args.prompts} prompts x {args.num_images} images = {count} images, batch {args.batch_size}, "
          f"{args.steps} steps {args.sampler}, CFG {args.cfg}; median of {args.repeats} interleaved repeats "
          f"after 1 warm-up")
    # CPU seconds only mean something on the CPU device with one thread (a GPU run waits on the device)
    clocks = ["wall"] + (["cpu"] if str(backbone.device) == "cpu" and torch.get_num_threads() == 1 else [])
    print("| what is timed | clock | builder img/s | pipeline img/s | builder / pipeline | target |\n"
          "|---|---|---|---|---|---|")
    for name in clocks:
        r = res[name]
        print(f"| sampling to 8-bit pixels (A: PoolBuilder.sample_pixels; B: pipeline calls + np.asarray) | {name} | "
              f"{rate(r['builder_sample_s'])} | {rate(r['pipeline_sample_s'])} | {r['ratio_sampling']:.3f}x | |")
        print(f"| sampling + scoring (A: + PoolBuilder.score_pixels; B': + the same scorer on the same pixels) | "
              f"{name} | {rate(r['builder_sample_score_s'])} | {rate(r['pipeline_sample_score_s'])} | "
              f"{r['ratio_sample_score']:.3f}x | >= 1.0x |")
        print(f"| whole build() call (key incl. weight hash, PNGs, parquet, merge) vs B' | {name} | "
              f"{rate(r['builder_build_s'])} | {rate(r['pipeline_sample_score_s'])} | {r['ratio_build']:.3f}x | |")
    for name in clocks:
        print(f"paired per-repeat ratios, sampling + scoring, {name} clock: "
              f"{', '.join(f'{x:.3f}' for x in res[name]['paired_ratios'])}")
    print(f"same images: max |pixel diff| = {res['max_abs_pixel_diff']} (of 255) over {count} images x "
          f"{len(checks)} runs, at most {100 * res['pixels_differing']:.3f} % of values differ; "
          f"max |score diff| = {res['max_abs_score_diff']:.3g}")
    for name in clocks:
        ratio = res[name]["ratio_sample_score"]
        print(f"ratio builder/pipeline (sampling + scoring): {ratio:.3f}x, {name} clock "
              f"(target >= 1.0x: {'met' if ratio >= 1.0 else 'NOT met'})")
    return res


def tiny_pickscore(image_size: int = 224):
    """PickScore's code path with a tiny random CLIP (ViT patch 32, width 32, 2 layers) and the real CLIP BPE."""
    from transformers import CLIPModel

    from alignment.scorers.clip_scorers import PickScore
    from alignment.scorers.open_clip_convert import clip_config

    torch.manual_seed(0)
    clip = CLIPModel(clip_config(embed_dim=32, image_size=image_size, patch_size=32, vision_width=32, vision_layers=2,
                                 vision_heads=4, text_width=32, text_layers=2, text_heads=4, vocab_size=49408))
    return PickScore(model=clip.eval(), tokenizer="clip_bpe", name=SCORER)


def cpu_suite(args) -> dict:
    from alignment.backbones.tiny import build_tiny_backbone

    torch.set_num_threads(args.threads)
    backbone = build_tiny_backbone(resolution=args.resolution).eval()  # conf/backbone/tiny.yaml: resolution 32
    scorer = tiny_pickscore()
    return compare(backbone, scorer, args, f"CPU, tiny backbone @{backbone.resolution}px, {args.threads} threads, "
                                           f"torch {torch.__version__}")


def gpu_suite(args) -> dict:
    from transformers import CLIPModel

    from alignment.backbones.architectures import build_random_backbone
    from alignment.scorers.clip_scorers import PickScore
    from alignment.scorers.open_clip_convert import vit_h14_config

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    backbone = build_random_backbone("sd15", scale=args.scale, dtype=dtype, device=args.device).eval()
    if args.resolution:
        backbone.resolution = args.resolution
    backbone.to(args.device)
    torch.manual_seed(0)
    with torch.device(args.device):  # PickScore's architecture (CLIP ViT-H/14) with random weights; tiny when small
        clip = CLIPModel(vit_h14_config()) if args.scale == "full" else None
    scorer = (PickScore(model=clip.eval(), tokenizer="clip_bpe", dtype=dtype, name=SCORER) if clip is not None
              else tiny_pickscore()).to(args.device)
    title = (f"{args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
             f"SD 1.5 architecture ({args.scale}, random weights) @{backbone.resolution}px, {args.dtype}, "
             f"torch {torch.__version__}")
    return compare(backbone, scorer, args, title)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite")

    def common(p, prompts, num_images, steps, batch, repeats, threads):
        p.add_argument("--prompts", type=int, default=prompts, help="prompts in the pool file")
        p.add_argument("--num-images", type=int, default=num_images, help="N images per prompt")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=batch)
        p.add_argument("--cfg", type=float, default=5.0)
        p.add_argument("--sampler", choices=["ddim", "dpmsolver"], default="dpmsolver")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--repeats", type=int, default=repeats)
        p.add_argument("--threads", type=int, default=threads)
        p.add_argument("--json", type=Path, default=None)

    cpu = sub.add_parser("cpu")
    common(cpu, 4, 8, 20, 8, 5, 2)
    cpu.add_argument("--resolution", type=int, default=32, help="tiny backbone resolution (its config: 32)")
    gpu = sub.add_parser("gpu")
    common(gpu, 2, 8, 50, 8, 3, 0)
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    gpu.add_argument("--scale", default="full", choices=["full", "small"])
    gpu.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["cpu"]))
    results = gpu_suite(args) if args.suite == "gpu" else cpu_suite(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
