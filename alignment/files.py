"""Atomic file writes: write a temporary file in the target's folder, then rename it over the target, so a reader
(or a process killed half-way) never sees half a file. Every writer of data, weights and reports uses these."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (parent folders are created). ``fsync=True`` flushes the
    temporary file to disk before the rename (caches that must survive a power loss). The temporary name is unique
    per call, so concurrent writers of the same file never collide; the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path: str | os.PathLike, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def image_name(prompt_index: int, seed: int) -> str:
    """The file name of generated image ``(prompt, seed)`` (``alignment.generate``, ``alignment.evaluate``)."""
    return f"{prompt_index:05d}_seed{seed}.png"


def save_png(image, path: str | os.PathLike) -> Path:
    """A PIL image written atomically as PNG."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
