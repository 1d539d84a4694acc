"""Which submodules of a model an adapter attaches to.

Methods state their default placement in *roles* (``q k v o gate up down``, LLaMA names) and the
architecture table below maps each role to the module paths of a given model type. Users override
with ``targets=``: a list of module-path suffixes, a regular expression matched against the full
path, or ``"all-linear"``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from .errors import TargetError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")

_LLAMA_LIKE = {
    "q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
    "o": r"self_attn\.o_proj", "gate": r"mlp\.gate_proj", "up": r"mlp\.up_proj", "down": r"mlp\.down_proj",
}
_BERT_LIKE = {
    "q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense", "up": r"intermediate\.dense", "down": r"layer\.\d+\.output\.dense",
}
# Role -> regex searched (anchored at a dot or the start, and at the end) in module paths.
# Fused projections (GPT-2 c_attn, BLOOM query_key_value) serve q, k and v at once.
ARCHITECTURE_ROLES: dict[str, dict[str, str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                                "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3")},
    "gpt2": {"q": r"attn\.c_attn", "k": r"attn\.c_attn", "v": r"attn\.c_attn", "o": r"attn\.c_proj",
             "up": r"mlp\.c_fc", "down": r"mlp\.c_proj"},
    "gptj": {"q": r"attn\.q_proj", "k": r"attn\.k_proj", "v": r"attn\.v_proj", "o": r"attn\.out_proj",
             "up": r"mlp\.fc_in", "down": r"mlp\.fc_out"},
    "opt": {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
            "o": r"self_attn\.out_proj", "up": r"fc1", "down": r"fc2"},
    "bloom": {"q": r"query_key_value", "k": r"query_key_value", "v": r"query_key_value",
              "o": r"self_attention\.dense", "up": r"dense_h_to_4h", "down": r"dense_4h_to_h"},
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "electra", "vit")},
}

ADAPTER_CONTAINER = "peftlab"  # child name under which adapters live; never a target itself


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head(s): never adapted by default (``all-linear`` excludes them too)."""
    heads: set[str] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if module is head or leaf in {"lm_head", "classifier", "score", "qa_outputs"}:
            heads.add(path)
    return heads


def candidate_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Named modules that are part of the base model (adapter containers excluded)."""
    for path, module in model.named_modules():
        if path and ADAPTER_CONTAINER not in path.split("."):
            yield path, module


def _suffix_match(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _role_regex(pattern: str) -> re.Pattern:
    return re.compile(rf"(^|\.){pattern}$")


def paths_for_roles(model: nn.Module, roles: Sequence[str], accepts: Callable[[nn.Module], bool]) -> list[str]:
    table = ARCHITECTURE_ROLES.get(model_type(model) or "")
    if table is None:
        return []
    regexes = [_role_regex(table[r]) for r in roles if r in table]
    return [p for p, m in candidate_modules(model) if accepts(m) and any(rx.search(p) for rx in regexes)]


def role_of(model: nn.Module, path: str) -> str | None:
    """The role (q, k, ..., down) a module path plays in a known architecture, else None."""
    table = ARCHITECTURE_ROLES.get(model_type(model) or "", {})
    for role, pattern in table.items():
        if _role_regex(pattern).search(path):
            return role
    return None


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    *,
    accepts: Callable[[nn.Module], bool],
    default_roles: Sequence[str],
    method: str,
    kind: str,
) -> list[str]:
    """Module paths to adapt. Raises TargetError naming anything that matches nothing usable."""
    heads = output_head_paths(model)
    usable = [(p, m) for p, m in candidate_modules(model) if accepts(m)]
    if targets is None:
        paths = paths_for_roles(model, default_roles, accepts)
        if not paths:  # unknown architecture: every usable module but the head
            paths = [p for p, _ in usable if p not in heads]
        if not paths:
            raise TargetError(f"{method}: this model has no {kind} module to adapt")
        return paths
    if isinstance(targets, str):
        if targets == "all-linear":
            paths = [p for p, _ in usable if p not in heads]
        else:
            try:
                rx = re.compile(targets)
            except re.error as exc:
                raise TargetError(f"{method}: targets regex {targets!r} is invalid: {exc}") from None
            paths = [p for p, _ in usable if rx.fullmatch(p)]
        if not paths:
            raise TargetError(f"{method}: targets {targets!r} match no {kind} module of this model")
        return paths
    return _resolve_suffixes(model, list(targets), usable, method=method, kind=kind)


def _resolve_suffixes(model, suffixes, usable, *, method: str, kind: str) -> list[str]:
    if not suffixes:
        raise TargetError(f"{method}: targets is an empty list")
    all_paths = [p for p, _ in candidate_modules(model)]
    chosen: list[str] = []
    for suffix in suffixes:
        hits = [p for p, _ in usable if _suffix_match(p, suffix)]
        if hits:
            chosen.extend(h for h in hits if h not in chosen)
            continue
        wrong_kind = [p for p in all_paths if _suffix_match(p, suffix)]
        if wrong_kind:
            found = type(model.get_submodule(wrong_kind[0])).__name__
            raise TargetError(f"{method}: target {suffix!r} names {wrong_kind[0]} ({found}), "
                              f"but {method} adapts {kind} modules")
        leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in usable})
        close = difflib.get_close_matches(suffix.rsplit(".", 1)[-1], leaves, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; {kind} modules here: {', '.join(leaves[:12])}"
        raise TargetError(f"{method}: target {suffix!r} matches no module of this model{hint}")
    return chosen
