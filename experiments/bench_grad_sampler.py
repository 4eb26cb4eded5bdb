"""Memory of one DRaFT-style step with the gradient sampler (alignment.sampling.grad; docs/sampling.md).

    python experiments/bench_grad_sampler.py                    # tiny + toy backbones (what `make bench` runs)
    python experiments/bench_grad_sampler.py --backbones tiny   # tiny only

One step = ``sample_with_grad`` (DDIM, CFG 7.5, gradient through the last K steps) -> a differentiable loss on the
images -> ``backward()`` into a LoRA (rank 4, attention projections). Every setting runs in a fresh subprocess and
reports two figures that mean something on a CPU:

  saved    bytes of every tensor autograd saves for backward during the forward (``saved_tensors_hooks``; sum of
           numel · element_size, weights included); deterministic. "activations" counts each storage once and leaves
           out the model's parameters and buffers: the memory the graph really adds.
  RSS      peak RSS of the process (``ru_maxrss``) and its growth over the RSS just before the step (the backbone is
           built and the prompts encoded by then); a sanity figure, subject to the allocator: measured with glibc's
           mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``, RSS follows live tensors) and with the default.
           It includes the backward pass, where checkpointing recomputes one UNet call's activations at a time.

Target: with K = 1, peak memory stays flat (within 10 %) from 10 to 50 sampling steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red square", "a blue circle"]
SEEDS = [0, 1]
MIB = 2 ** 20


def build(backbone_name: str, resolution: int):
    from alignment.training.lora import add_lora

    if backbone_name == "tiny":
        from alignment.backbones.tiny import build_tiny_backbone

        backbone = build_tiny_backbone(resolution=resolution)
    elif backbone_name == "toy":
        from alignment.toy.backbone import build_toy_backbone

        backbone = build_toy_backbone()  # trained at 32 px
    else:
        raise SystemExit(f"unknown backbone {backbone_name!r} (tiny or toy)")
    add_lora(backbone.unet, rank=4, alpha=4)
    return backbone


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def child(backbone_name: str, resolution: int, steps: int, k: int, checkpointing: bool, threads: int) -> dict:
    """One DRaFT-style step in this (fresh) process; returns the figures as a dict."""
    from alignment.sampling.grad import sample_with_grad, seed_latents

    torch.set_num_threads(threads)
    backbone = build(backbone_name, resolution)
    model_storages = {t.untyped_storage().data_ptr() for t in [*backbone.parameters(), *backbone.buffers()]}
    cond = backbone.encode_prompt(PROMPTS)
    uncond = backbone.negative_conditioning(len(PROMPTS))
    latents = seed_latents(backbone, SEEDS)
    saved = {"bytes": 0, "count": 0}
    activation_storages: dict[int, int] = {}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        saved["bytes"] += size
        saved["count"] += 1
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in model_storages:
            activation_storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    rss_before = current_rss_mib()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sample_with_grad(backbone, cond, uncond, latents, num_inference_steps=steps, guidance_scale=7.5,
                               grad_steps=k, checkpointing=checkpointing)
        loss = ((out.images - 0.5) ** 2).mean()  # a differentiable stand-in for a reward
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    lora_grad = sum(float(p.grad.abs().sum()) for p in backbone.unet.parameters() if p.grad is not None)
    return {"backbone": backbone_name, "steps": steps, "k": k, "checkpointing": checkpointing,
            "saved_mib": saved["bytes"] / MIB, "saved_tensors": saved["count"],
            "activation_mib": sum(activation_storages.values()) / MIB, "peak_rss_mib": peak,
            "rss_growth_mib": peak - rss_before, "seconds": seconds, "lora_grad_l1": lora_grad}


# glibc raises its mmap threshold after large frees, so freed activations stay in the heap and peak RSS reflects
# fragmentation more than live tensors (K = 10 with checkpointing read +492 MiB instead of +115 MiB). Pinning the
# threshold returns every large free to the OS; the unpinned figure is printed next to it.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_setting(args, backbone_name: str, steps: int, k: int, checkpointing: bool) -> dict:
    """The setting in a fresh process, with glibc's mmap threshold pinned and with the default allocator."""
    cmd = [sys.executable, __file__, "--child", backbone_name, str(steps), str(k), str(int(checkpointing)),
           "--resolution", str(args.resolution), "--threads", str(args.threads)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    figures = []
    for extra in (PINNED_MALLOC, {}):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1", **extra})
        if proc.returncode != 0:
            raise SystemExit(f"setting {backbone_name} steps={steps} K={k} failed:\n{proc.stderr[-3000:]}")
        figures.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    pinned, default = figures
    return {**pinned, "default_malloc_peak_rss_mib": default["peak_rss_mib"],
            "default_malloc_rss_growth_mib": default["rss_growth_mib"]}


def table(title: str, rows: list[dict], base: dict) -> str:
    def cell(row: dict, key: str, unit: str = "MiB", digits: int = 2) -> str:
        return f"{row[key]:.{digits}f} {unit} ({row[key] / base[key]:.2f}×)"

    lines = [title, "",
             "| steps | K | checkpointing | saved for backward | activations (unique) | peak RSS "
             "| RSS growth of the step | peak RSS, default malloc | RSS growth, default malloc | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ckpt = "on" if r["checkpointing"] else "off"
        lines.append(f"| {r['steps']} | {r['k']} | {ckpt} | {cell(r, 'saved_mib')} | {cell(r, 'activation_mib')} | "
                     f"{cell(r, 'peak_rss_mib', digits=0)} | {cell(r, 'rss_growth_mib', digits=1)} | "
                     f"{cell(r, 'default_malloc_peak_rss_mib', digits=0)} | "
                     f"{cell(r, 'default_malloc_rss_growth_mib', digits=1)} | {r['seconds']:.1f} s |")
    return "\n".join(lines)


def within(rows: list[dict], base: dict, key: str) -> tuple[float, float]:
    ratios = [r[key] / base[key] for r in rows]
    return min(ratios), max(ratios)


def suite(args) -> list[dict]:
    results = []
    for name in args.backbones:
        sweep = [run_setting(args, name, n, 1, True) for n in args.steps]
        base = sweep[0]
        print(table(f"### {name}: K = 1, checkpointing on, {args.steps[0]} to {args.steps[-1]} sampling steps "
                    f"(ratio to {args.steps[0]} steps)", sweep, base), flush=True)
        verdicts = []
        for key, label in (("saved_mib", "saved for backward"), ("peak_rss_mib", "peak RSS"),
                           ("default_malloc_peak_rss_mib", "peak RSS (default malloc)"),
                           ("rss_growth_mib", "RSS growth of the step")):
            low, high = within(sweep, base, key)
            met = "met" if 0.9 <= low and high <= 1.1 else "NOT met"
            verdicts.append(f"{label} {low:.2f}–{high:.2f}× {met}")
        print(f"\ntarget, K = 1 flat within 10 % from {args.steps[0]} to {args.steps[-1]} steps: "
              + "; ".join(verdicts) + "\n", flush=True)
        n = args.steps[-1]
        settings = ((1, True), (2, True), (5, True), (1, False), (5, False), (n, True))
        extra = [run_setting(args, name, n, k, ckpt) for k, ckpt in dict.fromkeys(settings) if k <= n]
        print(table(f"### {name}: {n} sampling steps, K and checkpointing (ratio to K = 1, checkpointing on)", extra,
                    extra[0]) + "\n", flush=True)
        results += sweep + extra
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["tiny", "toy"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 30, 40, 50])
    parser.add_argument("--resolution", type=int, default=64, help="tiny backbone only (the toy one is 32 px)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=4, metavar=("BACKBONE", "STEPS", "K", "CHECKPOINTING"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, steps, k, ckpt = args.child
        print(json.dumps(child(name, args.resolution, int(steps), int(k), bool(int(ckpt)), args.threads)))
        return 0
    print(f"one DRaFT-style step: {len(PROMPTS)} prompts, CFG 7.5 (UNet batch {2 * len(PROMPTS)}), LoRA rank 4, "
          f"tiny at {args.resolution} px, toy at 32 px, {args.threads} thread(s), torch {torch.__version__}\n")
    results = suite(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
