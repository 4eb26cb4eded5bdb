"""The real CLIP BPE tokenizer, built offline.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (49408 tokens). Its vocabulary ships as
``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel. We never install open_clip (it
imports torchvision); ``fetch_clip_bpe()`` downloads only the wheel from the package registry at install time
(``make install``), extracts that one file into the cache, and ``build_clip_tokenizer()`` turns it into a
``transformers.CLIPTokenizer`` at run time without any network.

    python -m alignment.backbones.clip_vocab          # fetch into the cache (idempotent)
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from alignment.errors import ConfigError
from alignment.files import atomic_write_bytes

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the rest are unused); with 2 * 256 byte tokens and
# the two special tokens this gives the 49408-entry vocabulary of SD's text encoder.
NUM_MERGES = 49152 - 256 - 2


def cache_dir() -> Path:
    """Folder for files the project fetches once at install time (``ALIGNMENT_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("ALIGNMENT_CACHE_DIR", Path.home() / ".cache" / "alignment")).expanduser()


def bpe_path() -> Path:
    return cache_dir() / "clip_bpe" / BPE_FILENAME


def fetch_clip_bpe(force: bool = False) -> Path:
    """Download the open_clip_torch wheel (no dependencies) and extract the BPE merges file into the cache."""
    target = bpe_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               "open_clip_torch"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
        if not wheels:
            raise ConfigError(f"pip download open_clip_torch produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            data = wheel.read(f"open_clip/{BPE_FILENAME}")
    return atomic_write_bytes(data, target)  # a concurrent reader never sees half a file


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE alphabet: printable bytes map to themselves, the others to unused code points >= 256."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=4)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """The CLIP BPE tokenizer of SD 1.x/2.x as a ``transformers.CLIPTokenizer``, from the cached merges file."""
    from transformers import CLIPTokenizer

    path = bpe_path()
    if not path.exists():
        raise ConfigError(
            f"CLIP BPE vocabulary not found at {path}; run `make install` or `python -m alignment.backbones.clip_vocab`")
    vocab, merges = _vocab_and_merges(str(path))
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


if __name__ == "__main__":
    print(fetch_clip_bpe(force="--force" in sys.argv))
