"""Per-sample seeds: every random draw that must not depend on batch layout, process count or resumes is taken from
a ``torch.Generator`` seeded by a hash of what identifies it (docs/conventions.md#reproducible-noise)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. run seed, step, dataset row, stream), identical in every process and
    Python session (``hash()`` is salted per process, blake2b is not)."""
    text = ":".join(str(int(p)) if isinstance(p, bool) else str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
