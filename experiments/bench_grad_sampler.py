"""Memory of one DRaFT-style step with the gradient sampler (alignment.sampling.grad; docs/sampling.md).

    python experiments/bench_grad_sampler.py                    # tiny + toy backbones (what `make bench` runs)
    python experiments/bench_grad_sampler.py --backbones tiny   # tiny only
    python experiments/bench_grad_sampler.py gpu                # SD 1.5 architecture @512, random weights, one GPU

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

``gpu``: the 24 GB requirement (Focus-N-Fix issue: a DRaFT-1 step on SD 1.5 at 512 px fits a 24 GB GPU with gradient
checkpointing). SD 1.5's real UNet + VAE + CLIP text encoder built from their configs with random weights
(``alignment.backbones.architectures.build_random_backbone("sd15", "full")``, no download), frozen weights in bf16
(``--dtype fp16`` / ``fp32``) under autocast, LoRA rank 64 on to_q/to_k/to_v/to_out.0 (conf/method/draft.yaml) in
fp32, AdamW. One step = ``sample_with_grad`` (DDIM, 50 steps, CFG 7.5, gradient through the last K steps, batch 1 at
512 px) -> the same stand-in loss on the decoded image -> ``backward()`` -> ``optimizer.step()``. Checkpointing modes
(``--checkpointing``), each a setting the recipe can run:

  sampler       ``method.checkpoint_sampling=true`` (DRaFT's default): each guided UNet call of the last K steps and
                the VAE decode are recomputed whole in the backward pass
  sampler+unet  the same plus ``method.gradient_checkpointing=true`` (diffusers' block-level checkpointing in the UNet)
  off           neither: the comparison row

Every (K, mode) runs in a fresh subprocess: ``--warmup`` untimed steps (the optimizer state exists by then), then one
timed step. On CUDA it reports ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the timed step, the
device memory outside PyTorch's allocator (CUDA context, libraries; ``mem_get_info`` minus reserved) and whether
reserved + that fits 24 GiB; on the CPU the peak RSS and its growth over the step, as above. The stand-in loss has no
model: a real reward model's weights and its backward pass come on top. Small CPU version (the test):
``gpu --device cpu --scale small --resolution 64 --steps 4``.
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


# ------------------------------------------------------------------------------------------------ gpu: SD 1.5, DRaFT-K
GIB = 2 ** 30
GPU_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red square on a white table",
               "a blue circle in the sky", "an orange cat on a sofa"]
# mode -> (sample_with_grad's checkpointing = method.checkpoint_sampling, UNet block-level
#          checkpointing = method.gradient_checkpointing)
CHECKPOINTING = {"sampler": (True, False), "sampler+unet": (True, True), "off": (False, False)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_child(args) -> dict:
    """One (K, checkpointing) setting of the gpu suite in this (fresh) process: warm-up steps, then one timed step."""
    from alignment.backbones.architectures import build_random_backbone
    from alignment.sampling.grad import sample_with_grad, seed_latents
    from alignment.training.lora import add_lora

    k, mode = int(args.setting[0]), args.setting[1]
    calls, blocks = CHECKPOINTING[mode]
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = build_random_backbone("sd15", scale=args.scale, dtype=str(dtype).removeprefix("torch."),
                                     device=args.device)
    if args.resolution:
        backbone.resolution = args.resolution
    backbone.to(args.device)
    add_lora(backbone.unet, rank=args.rank, alpha=args.rank)  # conf/method/draft.yaml: rank 64, alpha 64
    if blocks:
        backbone.unet.enable_gradient_checkpointing()
    params = [p for p in backbone.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)  # draft.yaml's optimizer
    prompts = [GPU_PROMPTS[i % len(GPU_PROMPTS)] for i in range(args.batch)]
    cond = backbone.encode_prompt(prompts)  # the text encoder is frozen: encoded once, outside the step
    uncond = backbone.negative_conditioning(len(prompts))
    latents = seed_latents(backbone, list(range(args.batch)))
    result = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = sample_with_grad(backbone, cond, uncond, latents, num_inference_steps=args.steps,
                                   guidance_scale=args.cfg, grad_steps=k, checkpointing=calls)
            loss = ((out.images.float() - 0.5) ** 2).mean()  # a differentiable stand-in for a reward
        loss.backward()
        result["grad_l1"] = sum(float(p.grad.float().abs().sum()) for p in params if p.grad is not None)
        optimizer.step()
        sync()
        result["loss"] = float(loss)
        return time.perf_counter() - start

    model_gib, seconds, oom = None, float("nan"), None
    try:  # on a small GPU (a real 24 GB card) a setting may not fit: a row that says so, not a crash
        for _ in range(args.warmup):
            one_step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            model_gib = torch.cuda.memory_allocated() / GIB  # weights, LoRA, optimizer state (after warm-up), prompts
        rss_before = current_rss_mib()
        seconds = one_step()
    except torch.OutOfMemoryError as err:
        oom = str(err).splitlines()[0]
        result.setdefault("loss", float("nan"))
        result.setdefault("grad_l1", float("nan"))
        rss_before = current_rss_mib()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {"arch": "sd15", "scale": args.scale, "device": args.device,
           "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "resolution": backbone.resolution, "batch": args.batch, "steps": args.steps, "cfg": args.cfg, "k": k,
           "checkpointing": mode, "dtype": args.dtype, "lora_rank": args.rank,
           "lora_params": sum(p.numel() for p in params), "warmup": args.warmup, "seconds": seconds,
           "loss": result["loss"], "lora_grad_l1": result["grad_l1"], "peak_rss_mib": peak_rss,
           "rss_growth_mib": peak_rss - rss_before, "budget_gib": args.budget_gib, "oom": oom}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        reserved_now = torch.cuda.memory_reserved()
        row.update(model_gib=model_gib, max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   non_pytorch_gib=(total - free - reserved_now) / GIB, device_total_gib=total / GIB)
        row["device_peak_gib"] = row["max_reserved_gib"] + row["non_pytorch_gib"]
        row["fits_budget"] = oom is None and row["device_peak_gib"] <= args.budget_gib
    else:
        row.update(model_gib=None, max_allocated_gib=None, max_reserved_gib=None, non_pytorch_gib=None,
                   device_total_gib=None, device_peak_gib=None, fits_budget=None)
    return row


def gpu_setting(args, argv: list[str], k: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "gpu", *argv, "--setting", str(k), mode]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    if not args.device.startswith("cuda"):  # RSS follows live tensors (see PINNED_MALLOC)
        env.update(PINNED_MALLOC)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"setting K={k} checkpointing={mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_table(rows: list[dict]) -> str:
    cuda = rows[0]["device"].startswith("cuda")
    if cuda:
        budget = rows[0]["budget_gib"]
        lines = ["| K | checkpointing | dtype | max allocated | max reserved | outside PyTorch (context) "
                 f"| device peak (reserved + outside) | fits {budget:g} GiB | step time |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            time_cell = "out of memory" if r["oom"] else f"{r['seconds']:.2f} s"
            lines.append(f"| {r['k']} | {r['checkpointing']} | {r['dtype']} | {r['max_allocated_gib']:.2f} GiB | "
                         f"{r['max_reserved_gib']:.2f} GiB | {r['non_pytorch_gib']:.2f} GiB | "
                         f"{r['device_peak_gib']:.2f} GiB | {'yes' if r['fits_budget'] else 'NO'} | "
                         f"{time_cell} |")
    else:
        lines = ["| K | checkpointing | dtype | peak RSS | RSS growth of the step | step time |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['k']} | {r['checkpointing']} | {r['dtype']} | {r['peak_rss_mib']:.0f} MiB | "
                         f"{r['rss_growth_mib']:.1f} MiB | {r['seconds']:.2f} s |")
    return "\n".join(lines)


def gpu_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_grad_sampler.py gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", default="full", choices=["full", "small"],
                        help="small: scaled-down SD 1.5 (same block structure) for a CPU smoke run")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="frozen weights and autocast (LoRA in fp32); default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="prompts per step (UNet batch 2x with CFG)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2], help="gradient through the last K steps")
    parser.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINTING), choices=list(CHECKPOINTING))
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (conf/method/draft.yaml: 64)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 1 on CUDA, 0 on CPU")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--setting", nargs=2, metavar=("K", "CHECKPOINTING"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    if args.setting:
        print(json.dumps(gpu_child(args)))
        return 0
    # the children get the resolved options (not --json / --setting)
    child_argv = ["--device", args.device, "--scale", args.scale, "--dtype", args.dtype,
                  "--resolution", str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps),
                  "--cfg", str(args.cfg), "--rank", str(args.rank), "--warmup", str(args.warmup),
                  "--budget-gib", str(args.budget_gib), "--threads", str(args.threads)]
    print(f"one DRaFT-K step: SD 1.5 architecture ({args.scale}, random weights) @{args.resolution}px, batch "
          f"{args.batch} (UNet batch {2 * args.batch} with CFG {args.cfg}), {args.steps} DDIM steps, LoRA rank "
          f"{args.rank}, {args.dtype}, {args.warmup} warm-up step(s) then 1 timed, {args.device}, "
          f"torch {torch.__version__}\n", flush=True)
    rows = []
    for k in args.k:
        for mode in args.checkpointing:
            row = gpu_setting(args, child_argv, k, mode)
            rows.append(row)
            memory = (f"max allocated {row['max_allocated_gib']:.2f} GiB, max reserved {row['max_reserved_gib']:.2f} "
                      f"GiB, device peak {row['device_peak_gib']:.2f} GiB" if cuda else
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['rss_growth_mib']:.1f} MiB in the step)")
            print(f"K={k} checkpointing={mode}: {memory}, {row['seconds']:.2f} s, loss {row['loss']:.4g}, "
                  f"LoRA grad L1 {row['lora_grad_l1']:.4g}" + (f", OUT OF MEMORY: {row['oom']}" if row["oom"] else ""),
                  flush=True)
    device = rows[0]["device_name"]
    print(f"\n### {device}: one DRaFT-K step, SD 1.5 architecture ({args.scale}) @{args.resolution}px, batch "
          f"{args.batch}, {args.steps} steps, LoRA rank {args.rank}, {args.dtype}\n")
    print(gpu_table(rows))
    if cuda:
        for row in rows:
            if row["k"] == 1 and row["checkpointing"] != "off":
                print(f"\nrequirement, DRaFT-1 with checkpointing={row['checkpointing']} fits {args.budget_gib:g} GiB: "
                      f"{'met' if row['fits_budget'] else 'NOT met'} ({row['device_peak_gib']:.2f} GiB"
                      f"{', out of memory' if row['oom'] else ''})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu"]:
        return gpu_main(argv[1:])
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
