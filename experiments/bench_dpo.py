"""Benchmarks of the Diffusion-DPO training step; every ratio is measured side by side in one run.

    python experiments/bench_dpo.py cpu              # tiny backbone on the CPU (what `make bench` runs)
    python experiments/bench_dpo.py gpu              # SD 1.5 @512 and SDXL @1024, random weights, one GPU, bf16
    python experiments/bench_dpo.py flops            # model FLOPs per DPO pair, counted on the meta device (no GPU)

CPU suite (issue targets in brackets):
  1. steps/s of `alignment.run`'s DPO step (timestamps in metrics.jsonl) vs a bare PyTorch loop doing the same
     math on the same cached batches                                                [framework overhead <= 5 %]
  2. the same run with the latent cache vs encoding images and prompts every step  [cache >= 1.5x faster]
  3. peak RSS growth of LoRA-DPO vs LoRA-SFT at the same number of images per step [<= 1.15x, no second UNet]
GPU suite: pairs/s and model-FLOPs utilisation (FLOPs counted by torch's FlopCounterMode on one step, against the
989 TFLOP/s dense bf16 peak of an H100 by default) for each switch (cache, SDPA, channels_last, compile) and batch
size. Runs on the CPU at small size for testing: `gpu --device cpu --scale small --resolution 64 --steps 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignment.objectives.base import draw_timesteps_and_noise, sample_seed  # noqa: E402


# ------------------------------------------------------------------------------------------------ shared pieces
def bare_dpo_step(backbone, unet, latents_w, latents_l, cond, timesteps, noise, beta, optimizer, params,
                  clip: float | None = 1.0):
    """Diffusion-DPO written directly against the UNet: one policy forward+backward over w||l, one reference
    forward with adapters disabled, AdamW step. No framework objects."""
    latents = torch.cat([latents_w, latents_l])
    t = torch.cat([timesteps, timesteps])
    eps = torch.cat([noise, noise])
    hidden = torch.cat([cond["encoder_hidden_states"]] * 2)
    extra = {k: torch.cat([v, v]) for k, v in cond.items() if k != "encoder_hidden_states"}
    kwargs = {"added_cond_kwargs": extra} if extra else {}
    alpha_bar = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * eps
    pred = unet(noisy, t, encoder_hidden_states=hidden, **kwargs).sample
    err = (pred.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))
    with torch.no_grad():
        unet.disable_adapters()
        ref = unet(noisy, t, encoder_hidden_states=hidden, **kwargs).sample
        unet.enable_adapters()
        ref_err = (ref.float() - eps.float()).pow(2).mean(dim=(1, 2, 3))
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    loss = -F.logsigmoid(-0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return loss.detach()


def compose(overrides: list[str], output_dir: Path):
    from hydra import compose as hydra_compose, initialize_config_dir

    from alignment.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}"])


def step_seconds(run_dir: Path, warmup: int) -> list[float]:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]


# --------------------------------------------------------------------------------------------------- CPU suite
CPU_RUN = ["backbone=tiny", "logger=none", "samples.every_n_steps=0", "checkpoint.every_n_steps=100000",
           "trainer.enable_progress_bar=false", "dataset.center_crop=true", "dataset.batch_size=4"]


def run_framework(workdir: Path, name: str, steps: int, warmup: int, cache: bool) -> float:
    """Median seconds per step of alignment.run (in this process), from its metrics.jsonl timestamps."""
    from alignment.run import train

    run_dir = workdir / name
    cfg = compose([*CPU_RUN, f"trainer.max_steps={steps + warmup}", f"dataset.cache={str(cache).lower()}",
                   f"dataset.cache_dir={workdir / 'cache'}"], run_dir)
    train(cfg)
    return statistics.median(step_seconds(run_dir, warmup))


def run_bare(workdir: Path, steps: int, warmup: int) -> float:
    """Median seconds per step of the bare loop over the same cached batches, sampler and noise."""
    from omegaconf import OmegaConf

    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.data.cache import cached_pairs
    from alignment.data.sampler import StepIndexedSampler
    from alignment.training.recipe import make_builder, prepare_data
    from alignment.training.lora import add_lora

    cfg = compose([*CPU_RUN, f"dataset.cache_dir={workdir / 'cache'}"], workdir / "bare")
    data = cfg.dataset
    dataset = prepare_data(cfg, make_builder(cfg))  # the same rows, transform and seed as alignment.run
    torch.manual_seed(cfg.seed)
    backbone = build_tiny_backbone()
    dataset = cached_pairs(dataset, backbone, OmegaConf.to_container(data, resolve=True))
    add_lora(backbone.unet, rank=cfg.method.lora.rank, alpha=cfg.method.lora.alpha,
             target_modules=cfg.method.lora.target_modules)
    params = [p for p in backbone.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.method.optimizer.lr, weight_decay=cfg.method.optimizer.weight_decay)
    total = steps + warmup
    sampler = StepIndexedSampler(len(dataset), data.batch_size, total, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, sampler=sampler,
                                         collate_fn=dataset.collate_fn)
    scaling = backbone.vae.config.scaling_factor
    durations, last = [], time.perf_counter()
    for step, batch in enumerate(loader):
        index = torch.as_tensor(batch["index"])
        latents = []
        for key, stream in (("moments_w", 2), ("moments_l", 3)):
            mean, std = batch[key].chunk(2, dim=1)
            n = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=torch.Generator().manual_seed(
                sample_seed(cfg.seed, step, int(i), stream))) for i in index])
            latents.append((mean + std * n) * scaling)
        cond = {k[len("cond."):]: v for k, v in batch.items() if k.startswith("cond.")}
        t, eps = draw_timesteps_and_noise(cfg.seed, step, index, tuple(latents[0].shape[1:]), 1000)
        bare_dpo_step(backbone, backbone.unet, latents[0], latents[1], cond, t, eps, float(cfg.method.beta),
                      optimizer, params)
        now = time.perf_counter()
        durations.append(now - last)
        last = now
    return statistics.median(durations[warmup + 1:])


def peak_rss_growth_mib(method: str, batch_size: int, steps: int, overrides: tuple[str, ...] = (),
                        absolute: bool = False) -> float:
    """Peak RSS growth while training (or, with ``absolute``, the process's peak RSS), in a fresh process (so other
    runs' memory does not count). ``overrides``: further config overrides, e.g. ``method.reference=snapshot``."""
    out = subprocess.run([sys.executable, __file__, "memory-child", method, str(batch_size), str(steps), *overrides],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    growth, peak = out.stdout.strip().splitlines()[-1].split()
    return float(peak if absolute else growth)


def memory_child(method: str, batch_size: int, steps: int, overrides: list[str] | None = None) -> None:
    """Build everything, note the RSS, train, print ``<peak RSS growth> <peak RSS>`` (MiB) as the last line."""
    from alignment.training.recipe import make_builder, prepare_data
    import lightning as L

    from alignment.config import instantiate_checked, to_plain
    from alignment.objectives.compose import build_objective
    from alignment.training.datamodule import AlignmentDataModule
    from alignment.training.module import AlignmentModule

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*CPU_RUN, f"method={method}", f"dataset.batch_size={batch_size}", "dataset.resolution=64",
                       "backbone.resolution=64", f"trainer.max_steps={steps}", *(overrides or [])], Path(tmp))
        dataset = prepare_data(cfg, make_builder(cfg))
        backbone = instantiate_checked(cfg.backbone, "backbone")
        module = AlignmentModule(backbone, build_objective(cfg.method, cfg.get("terms")),
                                 finetune="lora", lora=to_plain(cfg.method.lora), reference=cfg.method.reference,
                                 optimizer=to_plain(cfg.method.optimizer), lr_scheduler=to_plain(cfg.method.lr_scheduler))
        datamodule = AlignmentDataModule(dataset, batch_size=batch_size, seed=0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        with open("/proc/self/statm") as handle:
            before = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        trainer.fit(module, datamodule=datamodule)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"{peak - before:.1f} {peak:.1f}")


def cpu_suite(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {"source_image_size": args.source_size}
    # The synthetic pairs are stored as JPEGs of --source-size px (Pick-a-Pic's are 512 px and up); without the
    # cache every step decodes and resizes them, as the diffusers example does.
    CPU_RUN.append(f"dataset.generate.image_size={args.source_size}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["ALIGNMENT_DATA_DIR"] = str(workdir / "data")
        # interleave A/B/A/B so drifting machine load hits both sides alike
        framework, bare, encode = [], [], []
        for _ in range(args.repeats):
            bare.append(run_bare(workdir, args.steps, args.warmup))
            framework.append(run_framework(workdir, f"cached_{len(framework)}", args.steps, args.warmup, cache=True))
            encode.append(run_framework(workdir, f"encode_{len(encode)}", args.steps, args.warmup, cache=False))
        results["bare_s_per_step"] = statistics.median(bare)
        results["framework_s_per_step"] = statistics.median(framework)
        results["encode_every_step_s_per_step"] = statistics.median(encode)
    results["framework_overhead"] = results["framework_s_per_step"] / results["bare_s_per_step"] - 1
    results["cache_speedup"] = results["encode_every_step_s_per_step"] / results["framework_s_per_step"]
    dpo = peak_rss_growth_mib("dpo", args.memory_batch, 3)
    sft = peak_rss_growth_mib("sft", 2 * args.memory_batch, 3)  # the same 2B images per forward as B DPO pairs
    results.update({"dpo_peak_rss_growth_mib": dpo, "sft_peak_rss_growth_mib": sft, "dpo_over_sft_memory": dpo / sft})
    print(f"\nCPU, tiny backbone (32 px), source images {args.source_size} px, batch 4 pairs, LoRA rank 8, "
          f"median of {args.repeats}x{args.steps} steps, {args.threads} threads")
    print("| measurement | value | target |\n|---|---|---|")
    print(f"| bare PyTorch loop | {results['bare_s_per_step'] * 1000:.1f} ms/step | |")
    print(f"| alignment.run, latent cache | {results['framework_s_per_step'] * 1000:.1f} ms/step | |")
    print(f"| alignment.run, encode every step | {results['encode_every_step_s_per_step'] * 1000:.1f} ms/step | |")
    print(f"| framework overhead vs bare | {100 * results['framework_overhead']:+.1f} % | <= 5 % |")
    print(f"| cache speed-up | {results['cache_speedup']:.2f}x | >= 1.5x |")
    print(f"| peak RSS growth DPO ({args.memory_batch} pairs) / SFT ({2 * args.memory_batch} images), 64 px | "
          f"{dpo:.0f} / {sft:.0f} MiB = {results['dpo_over_sft_memory']:.2f}x | <= 1.15x |")
    return results


def reference_suite(args) -> dict:
    """Peak memory of LoRA-DPO with the snapshot reference (a second, frozen LoRA adapter) against the
    adapters-disabled reference, each in fresh processes, interleaved; plus the exact bytes the snapshot adds."""
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.training.lora import add_lora
    from alignment.training.reference import make_reference

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ALIGNMENT_DATA_DIR"] = str(Path(tmp) / "data")
        runs = {"base": [], "snapshot": []}
        for _ in range(args.repeats):
            for name in runs:
                runs[name].append(peak_rss_growth_mib("dpo", args.batch, args.steps, (f"method.reference={name}",),
                                                      absolute=True))
    backbone = build_tiny_backbone(resolution=64)
    add_lora(backbone.unet, rank=8, alpha=8)
    before = sum(p.numel() * p.element_size() for p in backbone.unet.parameters())
    make_reference("snapshot", backbone.unet, "lora")
    added = sum(p.numel() * p.element_size() for p in backbone.unet.parameters()) - before
    base, snapshot = statistics.median(runs["base"]), statistics.median(runs["snapshot"])
    print(f"\nLoRA-DPO on the tiny backbone at 64 px, {args.batch} pairs, {args.steps} steps, {args.threads} threads; "
          f"peak RSS of a fresh process, median of {args.repeats} (interleaved)")
    print("| reference | peak RSS | ratio |\n|---|---|---|")
    print(f"| base (adapters disabled) | {base:.0f} MiB | 1.00x |")
    print(f"| snapshot (frozen LoRA copy) | {snapshot:.0f} MiB | {snapshot / base:.3f}x |")
    print(f"snapshot adds {added / 2**20:.3f} MiB of parameters (one copy of the LoRA); UNet "
          f"{before / 2**20:.1f} MiB; runs: {runs}")
    return {"base_mib": base, "snapshot_mib": snapshot, "ratio": snapshot / base, "added_bytes": added, "runs": runs}


# --------------------------------------------------------------------------------------------------- GPU suite
def dpo_flops_per_pair(arch: str, scale: str = "full", resolution: int | None = None) -> dict[str, float]:
    """Model FLOPs of one LoRA-DPO pair (policy forward+backward over w||l, reference forward over w||l), counted
    by FlopCounterMode on the meta device — the real architecture, no memory, no GPU. Eager attention, so every
    attention matmul is counted (fused SDPA kernels are not, on some backends)."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from alignment.backbones.architectures import build_random_backbone
    from alignment.training.lora import add_lora

    backbone = build_random_backbone(arch, scale=scale, device="meta")
    if resolution:
        backbone.resolution = resolution
    add_lora(backbone.unet, rank=8, alpha=8)
    backbone.unet.set_attn_processor(AttnProcessor())
    shape = backbone.latent_shape
    hidden = backbone.unet.config.cross_attention_dim
    latents = torch.randn(2, *shape, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, hidden, device="meta")}
    if backbone.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, backbone.text_encoder_2.config.projection_dim,
                                                                  device="meta"),
                                       "time_ids": torch.zeros(2, 6, device="meta")}
    with FlopCounterMode(display=False) as pair:
        backbone.unet(latents, t, **kwargs).sample.float().pow(2).mean().backward()
        with torch.no_grad():
            backbone.unet.disable_adapters()
            backbone.unet(latents, t, **kwargs)
            backbone.unet.enable_adapters()
    one = {k: v[:1] if isinstance(v, torch.Tensor) else {kk: vv[:1] for kk, vv in v.items()} for k, v in kwargs.items()}
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        backbone.unet(latents[:1], t[:1], **one)
    side = backbone.resolution
    with FlopCounterMode(display=False) as vae, torch.no_grad():  # what the latent cache saves, per pair
        backbone.vae.encode(torch.randn(2, 3, side, side, device="meta"))
    with FlopCounterMode(display=False) as text, torch.no_grad():
        backbone.encode_prompt(["a photo"])
    return {"tflop_per_pair": pair.get_total_flops() / 1e12, "tflop_per_unet_forward": forward.get_total_flops() / 1e12,
            "tflop_vae_encode_pair": vae.get_total_flops() / 1e12, "tflop_text_encoders": text.get_total_flops() / 1e12,
            "resolution": side}


def gpu_case(arch: str, scale: str, resolution: int | None, batch: int, device: str, dtype: torch.dtype,
             cache: bool, attention: str, channels_last: bool, compile_unet: bool, steps: int, warmup: int,
             peak_tflops: float, tflop_per_pair: float) -> dict:
    from alignment.backbones.architectures import build_random_backbone
    from alignment.training.lora import add_lora
    from alignment.training.speed import apply_speed

    backbone = build_random_backbone(arch, scale=scale, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    if resolution:
        backbone.resolution = resolution
    add_lora(backbone.unet, rank=8, alpha=8)
    backbone.to(device)
    apply_speed(backbone, {"attention": attention, "channels_last": channels_last, "compile": compile_unet},
                "gpu" if device.startswith("cuda") else "cpu")
    params = [p for p in backbone.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    shape = backbone.latent_shape
    pixels = torch.rand(2 * batch, 3, backbone.resolution, backbone.resolution, device=device) * 2 - 1
    captions = ["a photo of an astronaut riding a horse"] * batch
    cached_latents = torch.randn(2 * batch, *shape, device=device)
    cached_cond = backbone.encode_prompt(captions)

    def one_step():
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype,
                            enabled=dtype != torch.float32):
            if cache:
                latents, cond = cached_latents, cached_cond
            else:  # what the diffusers example does: encode both images and the prompts every step
                latents = backbone.encode_images(pixels)
                cond = backbone.encode_prompt(captions)
            t = torch.randint(0, 1000, (batch,), device=device)
            noise = torch.randn(batch, *shape, device=device)
            latents_w, latents_l = latents.chunk(2)
            return bare_dpo_step(backbone, backbone.unet, latents_w.to(dtype), latents_l.to(dtype), cond, t,
                                 noise.to(dtype), 5000.0, optimizer, params)

    for _ in range(warmup + 1):  # the first step also compiles, when asked
        one_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    pairs_per_s = batch / seconds
    return {"arch": arch, "resolution": backbone.resolution, "batch": batch, "cache": cache, "attention": attention,
            "channels_last": channels_last, "compile": compile_unet, "s_per_step": seconds,
            "pairs_per_s": pairs_per_s, "tflop_per_pair": tflop_per_pair,
            "mfu": pairs_per_s * tflop_per_pair / peak_tflops,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def gpu_suite(args) -> list[dict]:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = []
    switches = [  # each row adds one switch to the previous one
        dict(cache=False, attention="eager", channels_last=False, compile_unet=False),
        dict(cache=True, attention="eager", channels_last=False, compile_unet=False),
        dict(cache=True, attention="sdpa", channels_last=False, compile_unet=False),
        dict(cache=True, attention="sdpa", channels_last=True, compile_unet=False),
    ]
    if not args.no_compile:
        switches.append(dict(cache=True, attention="sdpa", channels_last=True, compile_unet=True))
    for arch, resolution in zip(args.archs, args.resolutions):
        flops = dpo_flops_per_pair(arch, args.scale, resolution)["tflop_per_pair"]
        for batch in args.batch_sizes:
            for switch in switches:
                rows.append(gpu_case(arch, args.scale, resolution, batch, args.device, dtype, steps=args.steps,
                                     warmup=args.warmup, peak_tflops=args.peak_tflops, tflop_per_pair=flops,
                                     **switch))
                row = rows[-1]
                print(f"{arch} {row['resolution']}px batch {batch} cache={row['cache']} attn={row['attention']} "
                      f"cl={row['channels_last']} compile={row['compile']}: {row['pairs_per_s']:.2f} pairs/s, "
                      f"{row['tflop_per_pair']:.3f} TFLOP/pair, MFU {100 * row['mfu']:.1f} %", flush=True)
    print("\n| arch | px | batch | cache | attention | channels_last | compile | pairs/s | TFLOP/pair | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['resolution']} | {r['batch']} | {r['cache']} | {r['attention']} | "
              f"{r['channels_last']} | {r['compile']} | {r['pairs_per_s']:.2f} | {r['tflop_per_pair']:.3f} | "
              f"{100 * r['mfu']:.1f} % |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--steps", type=int, default=20)
    cpu.add_argument("--warmup", type=int, default=3)
    cpu.add_argument("--repeats", type=int, default=2)
    cpu.add_argument("--threads", type=int, default=2)
    cpu.add_argument("--memory-batch", type=int, default=8)
    cpu.add_argument("--json", type=Path, default=None)
    cpu.add_argument("--source-size", type=int, default=64,
                     help="side of the stored JPEGs (64: the demo data; 512: Pick-a-Pic-sized sources)")
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--archs", nargs="+", default=["sd15", "sdxl"])
    gpu.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    gpu.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 8, 16])
    gpu.add_argument("--scale", default="full", choices=["full", "small"])
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    gpu.add_argument("--steps", type=int, default=10)
    gpu.add_argument("--warmup", type=int, default=3)
    gpu.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    gpu.add_argument("--no-compile", action="store_true")
    gpu.add_argument("--json", type=Path, default=None)
    flops = sub.add_parser("flops", help="model FLOPs of one LoRA-DPO pair, counted on the meta device")
    flops.add_argument("--archs", nargs="+", default=["sd15", "sdxl"])
    flops.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    reference = sub.add_parser("reference", help="peak memory: snapshot reference vs adapters disabled")
    reference.add_argument("--batch", type=int, default=8)
    reference.add_argument("--steps", type=int, default=5)
    reference.add_argument("--repeats", type=int, default=3)
    reference.add_argument("--threads", type=int, default=1)
    child = sub.add_parser("memory-child")
    child.add_argument("method")
    child.add_argument("batch_size", type=int)
    child.add_argument("steps", type=int)
    child.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.suite == "memory-child":
        memory_child(args.method, args.batch_size, args.steps, args.overrides)
        return 0
    if args.suite == "reference":
        reference_suite(args)
        return 0
    if args.suite == "flops":
        for arch, resolution in zip(args.archs, args.resolutions):
            counted = dpo_flops_per_pair(arch, "full", resolution)
            encode = counted["tflop_vae_encode_pair"] + counted["tflop_text_encoders"]
            print(f"{arch} @ {resolution}px: {counted['tflop_per_unet_forward']:.3f} TFLOP per UNet forward, "
                  f"{counted['tflop_per_pair']:.3f} TFLOP per LoRA-DPO pair; encoding a pair costs "
                  f"{counted['tflop_vae_encode_pair']:.3f} (VAE) + {counted['tflop_text_encoders']:.3f} (text) TFLOP, "
                  f"so the latent cache saves up to {(counted['tflop_per_pair'] + encode) / counted['tflop_per_pair']:.2f}x")
        return 0
    results = cpu_suite(args) if args.suite == "cpu" else gpu_suite(args)
    if getattr(args, "json", None):
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
