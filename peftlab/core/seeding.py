"""Reproducible per-layer randomness: local CPU generators derived from a method's seed and names.

A local generator (never torch's global RNG) keeps a method's random init independent of what else the
program draws, of the device and of the order layers are built in.
"""

from __future__ import annotations

import zlib

import torch


def derived_seed(*parts: int | str) -> int:
    """One 63-bit seed from ints and strings (strings by CRC-32), order-sensitive."""
    value = 0
    for part in parts:
        part = zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
        value = (value * 1_000_003 + part) % 2**63
    return value


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with ``derived_seed(*parts)``, e.g. ``generator(config.seed, site.path)``."""
    return torch.Generator().manual_seed(derived_seed(*parts))


def offset_generator(seed: int | None, path: str) -> torch.Generator:
    """A CPU generator seeded with ``seed + crc32(path)`` (LoLDU's and NLoRA's layer seeds), or from
    torch's global RNG when ``seed`` is None."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    else:
        seed = seed + zlib.crc32(path.encode())
    return torch.Generator().manual_seed(seed)
