"""Pretrain the toy backbone on the toy-world corpus: the VAE first, then the text encoder and UNet together.

    python experiments/toy_world/pretrain.py --out outputs/toy_pretrain                  # both stages
    python experiments/toy_world/pretrain.py --out outputs/toy_pretrain --max-minutes 8  # stop after 8 min, saved
    python experiments/toy_world/pretrain.py --out outputs/toy_pretrain                  # ... and resume there
    python experiments/toy_world/pretrain.py --out outputs/toy_pretrain --export alignment/toy/weights

The recipe is experiments/toy_world/pretrain.yaml; ``--set key=value`` overrides any key (``--set unet.steps=500``).
Everything random is drawn from generators seeded by (seed, stage, step), so a run stopped and resumed gives the
same weights as one that ran through. Outputs in ``--out``: ``vae.pt`` / ``unet.pt`` (checkpoints; ``done`` set
when a stage finished), ``latents.pt`` (the corpus encoded by the final VAE), ``log.jsonl`` (loss, lr, s/step),
``probe_*.json`` (end-of-stage checks with the exact scorers), ``config.json`` (the resolved recipe).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from alignment.files import atomic_write  # noqa: E402
from alignment.toy import backbone as toyb  # noqa: E402
from alignment.toy.corpus import get_corpus  # noqa: E402

RECIPE = Path(__file__).resolve().parent / "pretrain.yaml"


# ----------------------------------------------------------------------------------------------- helpers
def load_recipe(path: Path, overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 100_003 + int(step))


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, str(tmp)))


class Stopper:
    """Stops a stage at a wall-clock limit, at a given step of each stage (tests) or on SIGINT/SIGTERM, after the
    current step (then checkpoints)."""

    def __init__(self, max_minutes: float | None, stop_at_step: int | None = None):
        self.deadline = time.time() + max_minutes * 60 if max_minutes else None
        self.stop_at_step = stop_at_step
        self.signalled = False
        self.step = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
                pass

    def _handle(self, *_):
        self.signalled = True

    def start_stage(self, step: int) -> None:
        """A stage (re)starts at ``step``: ``stop_at_step`` applies only to a stage that starts below it."""
        self.step, self.armed = step, self.stop_at_step is not None and step < self.stop_at_step

    def __call__(self) -> bool:
        if getattr(self, "armed", False) and self.step >= self.stop_at_step:
            return True
        return self.signalled or (self.deadline is not None and time.time() > self.deadline)


def log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------- stage 1: VAE
def train_vae(cfg: dict, out: Path, corpus, arch: toyb.ToyArchitecture, stopper: Stopper) -> bool:
    vcfg = cfg["vae"]
    vae = toyb.build_vae(arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=vcfg["lr"], weight_decay=0.0)
    ckpt_path, step = out / "vae.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(str(ckpt_path), weights_only=True)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if ckpt.get("done"):
            return True
        print(f"[vae] resuming at step {step}", flush=True)
    stopper.start_stage(step)
    images = corpus.images
    foreground = (corpus.mask_bits > 0).float()
    total = int(vcfg["steps"])
    vae.train()
    t_last, n_last = time.time(), 0
    while step < total:
        gen = step_generator(cfg["seed"], 1, step)
        idx = torch.randint(0, len(corpus), (vcfg["batch_size"],), generator=gen)
        x = images[idx].float() / 127.5 - 1
        weight = 1 + vcfg["foreground_weight"] * foreground[idx][:, None]
        for group in opt.param_groups:
            group["lr"] = vcfg["lr"] * lr_factor(step, total, vcfg["warmup"], 0.05)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = (weight * (recon - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + vcfg["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        stopper.step = step
        if step % 50 == 0 or step == total:
            dt = (time.time() - t_last) / max(1, step - n_last)
            t_last, n_last = time.time(), step
            record = {"stage": "vae", "step": step, "loss": loss.item(), "recon": rec.item(), "kl": kl.item(),
                      "lr": opt.param_groups[0]["lr"], "s_per_step": round(dt, 4)}
            log(out, record)
            print(json.dumps(record), flush=True)
        if step % cfg["checkpoint_every"] == 0 or step == total or stopper():
            done = step == total
            state = {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step, "done": False}
            if done:
                state["scaling_factor"] = measure_scaling(vae, images, vcfg["scale_samples"])
                state["done"] = True
            atomic_save(state, ckpt_path)
            if stopper() and not done:
                print(f"[vae] stopped at step {step}/{total}; run again to resume", flush=True)
                return False
    return True


@torch.no_grad()
def measure_scaling(vae, images: torch.Tensor, n: int) -> float:
    vae.eval()
    x = images[:n].float() / 127.5 - 1
    means, stds = encode_all(vae, x)
    z = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(0))
    return float(1.0 / z.std())


@torch.no_grad()
def encode_all(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, x.shape[0], batch):
        posterior = vae.encode(x[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def finished_vae(out: Path, arch: toyb.ToyArchitecture):
    ckpt = torch.load(str(out / "vae.pt"), weights_only=True)
    arch.scaling_factor = float(ckpt["scaling_factor"])
    vae = toyb.build_vae(arch)
    vae.load_state_dict(ckpt["model"])
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def probe_vae(out: Path, corpus, vae, n: int = 512) -> dict:
    """Reconstructions of held-out corpus images (the last n): pixel error, and the exact scorers' verdicts on the
    reconstructions vs the originals (does the VAE keep colours, shapes, heads, drops?)."""
    from alignment.toy.probe import score_images

    idx = torch.arange(len(corpus) - n, len(corpus))
    x = corpus.images[idx].float() / 127.5 - 1
    means, _ = encode_all(vae, x)
    recon = torch.cat([vae.decode(means[i:i + 256]).sample for i in range(0, n, 256)])
    recon01, orig01 = (recon / 2 + 0.5).clamp(0, 1), (x / 2 + 0.5)
    captions = [corpus.scenes[i]["caption"] for i in idx.tolist()]
    result = {"mse_minus1_1": float(((recon.clamp(-1, 1) - x) ** 2).mean()),
              "original": score_images(orig01, captions), "reconstruction": score_images(recon01, captions)}
    (out / "probe_vae.json").write_text(json.dumps(result, indent=1))
    save_grid(torch.cat([orig01[:32], recon01[:32]]), out / "vae_reconstructions.png", columns=16)
    return result


def save_grid(images01: torch.Tensor, path: Path, columns: int, scale: int = 3) -> None:
    from PIL import Image

    from alignment.sampling.sample import image_grid, to_pil

    grid = image_grid(to_pil(images01), columns)
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(str(path))


# --------------------------------------------------------------------------------------- stage 2: text + UNet
@torch.no_grad()
def corpus_latents(out: Path, corpus, vae) -> tuple[torch.Tensor, torch.Tensor]:
    path = out / "latents.pt"
    if path.exists():
        cached = torch.load(str(path), weights_only=True)
        return cached["mean"], cached["std"]
    means, stds = encode_all(vae, corpus.images.float() / 127.5 - 1)
    atomic_save({"mean": means, "std": stds}, path)
    return means, stds


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        params = [p for m in modules for p in m.parameters()]
        for p, s in zip(params, self.shadow):
            p.copy_(s)


def train_unet(cfg: dict, out: Path, corpus, arch: toyb.ToyArchitecture, vae, stopper: Stopper) -> bool:
    ucfg = cfg["unet"]
    tokenizer = toyb.build_clip_tokenizer()
    text_encoder, unet = toyb.build_text_encoder(arch, tokenizer), toyb.build_unet(arch)
    noise_scheduler, _ = toyb.build_schedulers(arch)
    alphas = noise_scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=ucfg["lr"], weight_decay=ucfg["weight_decay"])
    ema = EMA([unet, text_encoder], ucfg["ema"]) if ucfg["ema"] else None
    ckpt_path, step = out / "unet.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(str(ckpt_path), weights_only=True)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        step = ckpt["step"]
        if ckpt.get("done"):
            return True
        print(f"[unet] resuming at step {step}", flush=True)
    stopper.start_stage(step)
    means, stds = corpus_latents(out, corpus, vae)
    scale = float(vae.config.scaling_factor)
    captions = corpus.captions
    unique = sorted(set(captions)) + [""]
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty_index = len(unique) - 1
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    total = int(ucfg["steps"])
    unet.train()
    text_encoder.train()
    t_last, n_last = time.time(), step
    while step < total:
        gen = step_generator(cfg["seed"], 2, step)
        idx = torch.randint(0, len(corpus), (ucfg["batch_size"],), generator=gen)
        cap = caption_index[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < ucfg["caption_dropout"]
        cap[drop] = empty_index
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = noise if arch.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        for group in opt.param_groups:
            group["lr"] = ucfg["lr"] * lr_factor(step, total, ucfg["warmup"], ucfg["min_lr_ratio"])
        used, inverse = torch.unique(cap, return_inverse=True)  # encode each distinct caption once
        hidden = text_encoder(ids[used])[0][inverse]
        pred = unet(zt, t, encoder_hidden_states=hidden).sample
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ucfg["grad_clip"])
        opt.step()
        if ema is not None:
            ema.update(step)
        step += 1
        stopper.step = step
        if step % 50 == 0 or step == total:
            dt = (time.time() - t_last) / max(1, step - n_last)
            t_last, n_last = time.time(), step
            record = {"stage": "unet", "step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                      "s_per_step": round(dt, 4)}
            log(out, record)
            print(json.dumps(record), flush=True)
        if step % cfg["checkpoint_every"] == 0 or step == total or stopper():
            state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "done": step == total}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_save(state, ckpt_path)
            if stopper() and step < total:
                print(f"[unet] stopped at step {step}/{total}; run again to resume", flush=True)
                return False
    return True


def load_backbone(out: Path, arch: toyb.ToyArchitecture, use_ema: bool = True):
    """The backbone as trained so far (VAE + the latest UNet/text checkpoint, EMA weights by default)."""
    vae = finished_vae(out, arch)
    tokenizer = toyb.build_clip_tokenizer()
    text_encoder, unet = toyb.build_text_encoder(arch, tokenizer), toyb.build_unet(arch)
    ckpt = torch.load(str(out / "unet.pt"), weights_only=True)
    unet.load_state_dict(ckpt["unet"])
    text_encoder.load_state_dict(ckpt["text_encoder"])
    if use_ema and "ema" in ckpt:
        ema = EMA([unet, text_encoder], ckpt["ema"]["decay"])
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to([unet, text_encoder])
    return toyb.assemble(arch, tokenizer, text_encoder, vae, unet, name="toy", source=str(out / "unet.pt"))


def probe_unet(cfg: dict, out: Path, arch: toyb.ToyArchitecture, tag: str = "unet") -> dict:
    from alignment.toy.probe import prompt_following

    ecfg = cfg["eval"]
    result = {"step": torch.load(str(out / "unet.pt"), weights_only=True)["step"]}
    backbone = load_backbone(out, arch)
    # baseline: the trained VAE with a randomly initialised text encoder + UNet
    random = toyb.assemble(arch, backbone.tokenizer, toyb.build_text_encoder(arch, backbone.tokenizer), backbone.vae,
                           toyb.build_unet(arch), name="toy-random")
    t0 = time.time()
    for scale in ecfg["guidance_scales"]:
        result[f"cfg{scale:g}"] = prompt_following(backbone, ecfg["captions_per_kind"], ecfg["seeds"],
                                                    ecfg["num_inference_steps"], scale,
                                                    grid_path=out / f"samples_cfg{scale:g}.png")
    result["random_init_cfg3"] = prompt_following(random, ecfg["captions_per_kind"], ecfg["seeds"],
                                                   ecfg["num_inference_steps"], 3.0)
    result["probe_seconds"] = round(time.time() - t0, 1)
    (out / f"probe_{tag}.json").write_text(json.dumps(result, indent=1))
    return result


def export(out: Path, arch: toyb.ToyArchitecture, folder: Path, cfg: dict) -> Path:
    backbone = load_backbone(out, arch)
    arch.extra = {"recipe": cfg, "unet_step": torch.load(str(out / "unet.pt"), weights_only=True)["step"]}
    return toyb.save_weights(folder, arch, backbone.text_encoder, backbone.vae, backbone.unet, backbone.tokenizer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy backbone (VAE, then text encoder + UNet).")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs, probes)")
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    parser.add_argument("--stage", choices=["vae", "unet", "all"], default="all")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--probe", action="store_true", help="only run the probes of what is trained so far")
    parser.add_argument("--no-probe", action="store_true", help="skip the end-of-stage probes")
    parser.add_argument("--export", default=None, help="write config.json + model.safetensors here at the end")
    parser.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop each stage
    args = parser.parse_args(argv)
    cfg = load_recipe(Path(args.config), args.overrides)
    torch.set_num_threads(int(cfg["threads"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if saved.exists() and not args.probe:
        previous = json.loads(saved.read_text())
        changed = [k for k in ("corpus", "architecture", "vae") if previous.get(k) != cfg.get(k)]
        if changed and (out / "vae.pt").exists():
            sys.exit(f"{out}: was started with a different recipe ({', '.join(changed)} changed); use a new --out")
    saved.write_text(json.dumps(cfg, indent=1))
    arch = toyb.ToyArchitecture.from_dict(cfg["architecture"])
    stopper = Stopper(args.max_minutes, args.stop_at_step)
    corpus = get_corpus(cfg["corpus"]["n"], cfg["corpus"]["seed"])
    t0 = time.time()
    if args.probe:
        if (out / "vae.pt").exists():
            print(json.dumps(probe_vae(out, corpus, finished_vae(out, copy.deepcopy(arch))), indent=1))
        if (out / "unet.pt").exists():
            print(json.dumps(probe_unet(cfg, out, finished_arch(out, arch)), indent=1))
        return
    if args.stage in ("vae", "all"):
        if not train_vae(cfg, out, corpus, arch, stopper):
            return
        print(f"[vae] done in {time.time() - t0:.0f} s", flush=True)
        if not args.no_probe and not (out / "probe_vae.json").exists():
            print(json.dumps(probe_vae(out, corpus, finished_vae(out, copy.deepcopy(arch))), indent=1), flush=True)
    if args.stage in ("unet", "all"):
        arch = finished_arch(out, arch)
        vae = finished_vae(out, copy.deepcopy(arch))
        t1 = time.time()
        if not train_unet(cfg, out, corpus, arch, vae, stopper):
            return
        print(f"[unet] done in {time.time() - t1:.0f} s", flush=True)
        if not args.no_probe:
            print(json.dumps(probe_unet(cfg, out, arch), indent=1), flush=True)
    if args.export:
        print(export(out, finished_arch(out, arch), Path(args.export), cfg))


def finished_arch(out: Path, arch: toyb.ToyArchitecture) -> toyb.ToyArchitecture:
    arch = copy.deepcopy(arch)
    arch.scaling_factor = float(torch.load(str(out / "vae.pt"), weights_only=True)["scaling_factor"])
    return arch


if __name__ == "__main__":
    main()
