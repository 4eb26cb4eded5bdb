"""Cheap fingerprints of model weights, for keys of files derived from a model (latent caches, built datasets).

A file computed with a model must never be reused after the model changed, and hashing every byte of an SDXL UNet
(10 GB) at every start would cost more than it saves. So a module is fingerprinted by the names, dtypes and shapes
of all its tensors plus ``FINGERPRINT_SAMPLES`` evenly spaced elements of each: any change of a whole tensor
(fine-tuning, another checkpoint, a LoRA) changes it; an edit of single elements that no sampled position covers
goes unnoticed (delete the derived file after such surgery).

- :func:`module_fingerprint`: any ``nn.Module`` (a scorer, a UNet) -> hex digest.
- :func:`backbone_fingerprint`: a backbone's chosen parts (by attribute-name prefix) and its tokenizer(s). With the
  default parts (VAE and text encoders) it is exactly the latent cache's fingerprint, whose keys must not change.
- :func:`scorer_fingerprint`: a scorer's class, weights and plain settings (e.g. a CLIP score's ``mode``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # torch is imported where tensors are hashed: keys of model-free builders need no torch
    import torch

FINGERPRINT_SAMPLES = 1024  # evenly spaced elements hashed per weight tensor
ENCODER_PARTS = ("vae", "text_encoder")  # what the latent cache's stored tensors depend on
MODEL_PARTS = ("vae", "text_encoder", "unet")  # what a sampled image depends on
TOKENIZER_PROBE = "a photo of a cat, 4k, Ünïcödé <|endoftext|>"


def hash_tensors(tensors: Iterator[tuple[str, torch.Tensor]], digest) -> None:
    """Feed ``digest`` the names, dtypes, shapes and up to FINGERPRINT_SAMPLES evenly spaced elements (their raw
    bytes) of every tensor. The samples are gathered on the tensors' device and copied to the host once."""
    import torch

    samples: list[torch.Tensor] = []
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            # float32 linspace rounds n - 1 up to n for n > 2**24 (CLIP-L's token embedding): clamp the last index
            index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).long()
            index.clamp_(max=flat.numel() - 1)
            flat = flat[index]
        samples.append(flat.contiguous().view(torch.uint8))
    if samples:
        digest.update(torch.cat([s.to(samples[0].device) for s in samples]).cpu().numpy().tobytes())


def hash_modules(named_modules: Iterable[tuple[str, torch.nn.Module]], digest) -> None:
    """Feed ``digest`` each module's name, class and state-dict tensors (see :func:`hash_tensors`), in name order."""
    for name, module in sorted(named_modules, key=lambda item: item[0]):
        digest.update(f"[{name}:{type(module).__name__}]".encode())
        hash_tensors(((f"{name}.{k}", v) for k, v in module.state_dict().items()), digest)


def module_fingerprint(module: torch.nn.Module, name: str = "module") -> str:
    """Hex digest of one module's class and weights (a module without tensors still hashes its class)."""
    digest = hashlib.blake2b(digest_size=16)
    hash_modules([(name, module)], digest)
    return digest.hexdigest()


def class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def backbone_fingerprint(backbone, parts: tuple[str, ...] = ENCODER_PARTS) -> dict[str, Any]:
    """Class, name, source, weight dtype and a weight fingerprint of the backbone's child modules whose attribute
    names start with one of ``parts`` (default: the VAE and the text encoder(s)) plus its tokenizer(s).

    ``parts=MODEL_PARTS`` adds the UNet (what sampled images depend on). The default is the latent cache's key
    field and must stay byte-for-byte what it was, or every existing cache would be rebuilt."""
    digest = hashlib.blake2b(digest_size=16)
    hash_modules([(name, module) for name, module in backbone.named_children() if name.startswith(tuple(parts))],
                 digest)
    for name in sorted(k for k in vars(backbone) if k.startswith("tokenizer")):
        tokenizer = getattr(backbone, name)
        probe = tokenizer([TOKENIZER_PROBE], truncation=True).input_ids
        digest.update(json.dumps([name, type(tokenizer).__name__, len(tokenizer),
                                  int(getattr(tokenizer, "model_max_length", 0)), probe]).encode())
    return {"class": class_path(backbone), "name": str(getattr(backbone, "name", "")),
            "source": str(getattr(backbone, "source", None)),
            "weight_dtype": str(getattr(backbone, "weight_dtype", None)), "weights": digest.hexdigest()}


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


# Instance attributes that name or locate a scorer but do not change its scores.
SCORER_LABELS = ("name", "key", "training")


def scorer_fingerprint(scorer: torch.nn.Module) -> dict[str, Any]:
    """Class, weight fingerprint and plain public settings of a scorer.

    Settings such as a CLIP score's ``mode`` or an attribute classifier's ``target`` change the scores without
    changing a weight, so every public instance attribute holding a number, string, bool or a list of them is
    part of the fingerprint; the config name and key under which it was built are not (the same scorer built by
    ``build_scorers`` or directly has one fingerprint)."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(scorer).items())
                if not k.startswith("_") and k not in SCORER_LABELS and _plain(v)}
    return {"class": class_path(scorer), "weights": module_fingerprint(scorer, "scorer"), "settings": settings,
            "dtype": str(getattr(scorer, "dtype", None))}
