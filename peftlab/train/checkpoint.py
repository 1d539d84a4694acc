"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint is a directory ``checkpoints/step-00000123/`` holding the adapter files (as
``peftlab.save`` writes them) and ``trainer_state.pt``. It is assembled under a temporary name and
renamed into place only when complete, so a kill mid-write leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from peftlab.core.files import save

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"step-(\d{8})")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(root: Path, step: int, model, trainer_state: dict[str, Any], keep: int,
          names: str | list[str] = "default") -> Path:
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save(model, staging, name=names)
    torch.save(trainer_state, staging / STATE_FILE)
    with open(staging / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _prune(root, keep)
    return final


def latest(root: Path) -> Path | None:
    complete = [p for p in root.glob("step-*") if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: p.name) if complete else None


def read_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
