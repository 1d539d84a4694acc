"""Soft prompts: prompt tuning, P-tuning and prefix tuning (model-level adapters).

Prompt tuning (Lester et al. 2021, arXiv 2104.08691) learns n virtual token embeddings put in front
of every input::

    [v1 … vn] [x1 … xT]  ──► frozen model          trainable: n · hidden

P-tuning (Liu et al. 2021, arXiv 2103.10385) produces those n embeddings with a prompt encoder (an
MLP, as in HF PEFT and LLM-Adapters, or the paper's bidirectional LSTM + MLP). Prefix tuning (Li &
Liang 2021, arXiv 2101.00190) learns, for every layer, n key and value vectors that every query
attends to, optionally through a reparametrisation MLP from n embeddings.

Mechanics, shared by all three: a virtual token occupies positions 0..n-1, so real tokens start at
position n (as in HF PEFT), the attention mask gets n leading ones. The adapters hook the transformer
body (``model.model`` of a CausalLM) and cut its outputs back to the real tokens, so task heads,
logits and losses line up with input_ids (HF PEFT instead also scores x1 from the last virtual
token). With a KV cache the
virtual tokens live in the cache: the first call fills it (and marks it), later calls only shift the
mask and positions, so ``generate`` works unchanged. Prefix tuning needs a model whose attention
reads a KV cache it is given (decoder LMs, and BERT-style encoders, which use a cache passed in
though they never make one); prompt tuning and P-tuning work on any transformers model that accepts
``inputs_embeds``.

Initialisation [peftlab]: virtual tokens start at the embeddings of sampled vocabulary tokens
(Lester et al.'s best simple choice) or of ``init_token_ids``; prefix key/values start at the model's
own keys and values for such tokens (Li & Liang report real-word initialisation as more stable than
random), or at N(0, 1) with ``init="random"`` (HF PEFT's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import hf
from peftlab.core.errors import PeftlabError, TargetError
from peftlab.core.method import ModelAdapter, ModelMethod, check, config_field
from peftlab.core.registry import register

MARK = "_peftlab_virtual_tokens"  # attribute set on caches whose first n entries are virtual tokens


def _sample_token_ids(model: nn.Module, n: int, given: tuple[int, ...]) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    if given:
        ids = torch.tensor([given[i % len(given)] for i in range(n)])
        if ids.max() >= vocab or ids.min() < 0:
            raise TargetError(f"init_token_ids must lie in [0, {vocab})")
        return ids
    return torch.randint(0, vocab, (n,))


def _continuing(cache) -> bool:
    """True on decode steps: the cache already holds the virtual tokens (and the earlier input)."""
    if hf.cache_length(cache) == 0:
        return False
    if getattr(cache, MARK, None) is None:
        raise PeftlabError("soft prompts fill the KV cache themselves; pass an empty cache or none")
    return True


def _shift_for_cached(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Inputs of a call whose cache holds n virtual tokens: mask them in, move positions past them."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise PeftlabError("soft prompts need a 2-D attention mask")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return kwargs


def _mark(cache, n: int) -> None:
    if cache is not None:
        setattr(cache, MARK, n)


class VirtualTokens(ModelAdapter):
    """Puts ``embeddings()`` (n x hidden) in front of every input sequence."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def before(self, model, kwargs):
        cache_key = hf.cache_argument(model)
        cache = kwargs.get(cache_key) if cache_key else None
        if _continuing(cache):
            return _shift_for_cached(kwargs, self.n), None
        n = self.n
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        batch = embeds.shape[0]
        virtual = self.embeddings().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
        positions = kwargs.get("position_ids")
        kwargs = _shift_for_cached(kwargs, n)
        if positions is not None:
            front = torch.arange(n, device=positions.device).expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([front, positions + n], dim=-1)
        if kwargs.get("token_type_ids") is not None:
            tti = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([tti.new_zeros(tti.shape[0], n), tti], dim=1)
        _mark(cache, n)
        return kwargs, embeds.shape[1] + n

    def after(self, model, output, total_length):
        if total_length is None:
            return output
        _mark(hf.output_cache(output), self.n)
        for key in ("logits", "last_hidden_state", "hidden_states", "prediction_logits"):
            value = getattr(output, key, None)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == total_length:
                output[key] = value[:, self.n:]
            elif isinstance(value, tuple):
                output[key] = tuple(v[:, self.n:] if v.shape[1] == total_length else v for v in value)
        return output


def _check_embeddable(model: nn.Module, method: str) -> None:
    embeddable = callable(getattr(model, "get_input_embeddings", None))
    if not embeddable or "inputs_embeds" not in hf.forward_parameters(model):
        raise TargetError(f"{method} needs a transformers model that accepts inputs_embeds")


def _vocab_embeddings(model: nn.Module, n: int, token_ids: tuple[int, ...]) -> torch.Tensor:
    embedding = model.get_input_embeddings()
    ids = _sample_token_ids(model, n, token_ids).to(embedding.weight.device)
    with torch.no_grad():
        return embedding(ids).float()


# --------------------------------------------------------------------------------------------------
# Prompt tuning


class PromptTokens(VirtualTokens):
    def __init__(self, initial: torch.Tensor):
        super().__init__(initial.shape[0])
        self.prompt = nn.Parameter(initial.clone())

    def embeddings(self) -> torch.Tensor:
        return self.prompt


@register
@dataclass
class Prompt(ModelMethod):
    name: ClassVar[str] = "prompt"
    family: ClassVar[str] = "soft prompt"
    identity_at_init: ClassVar[bool] = False  # virtual tokens are attended to from the start
    paper: ClassVar[str] = "Prompt tuning, arXiv 2104.08691"
    formula: ClassVar[str] = "n · hidden (in total)"

    num_virtual_tokens: int = config_field(20, "number of virtual tokens n")
    init_token_ids: tuple[int, ...] = config_field((), "token ids to start from (cycled to n); empty: sampled")

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, self.name, "num_virtual_tokens must be positive")
        check(self.targets is None, self.name, "soft prompts take no targets")

    def check_model(self, model: nn.Module) -> None:
        _check_embeddable(model, self.name)

    def build(self, model: nn.Module, restoring: bool = False) -> ModelAdapter:
        return PromptTokens(_vocab_embeddings(model, self.num_virtual_tokens, self.init_token_ids))

    def trainable_count_for(self, model_config) -> int:
        return self.num_virtual_tokens * hf.attention_geometry(model_config)[3]


# --------------------------------------------------------------------------------------------------
# P-tuning


class PromptEncoderTokens(VirtualTokens):
    def __init__(self, initial: torch.Tensor, encoder: str, hidden: int):
        super().__init__(initial.shape[0])
        width = initial.shape[1]
        self.inputs = nn.Parameter(initial.clone())
        lstm = encoder == "lstm"
        self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True) if lstm else None
        mlp_in = 2 * hidden if self.lstm is not None else width
        mlp_hidden = 2 * hidden if self.lstm is not None else hidden
        layers = [nn.Linear(mlp_in, mlp_hidden), nn.ReLU()]
        if self.lstm is None:
            layers += [nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(mlp_hidden, width))

    def embeddings(self) -> torch.Tensor:
        h = self.inputs
        if self.lstm is not None:
            h = self.lstm(h.unsqueeze(0))[0].squeeze(0)
        return self.mlp(h)


@register
@dataclass
class PTuning(ModelMethod):
    name: ClassVar[str] = "ptuning"
    family: ClassVar[str] = "soft prompt"
    identity_at_init: ClassVar[bool] = False  # virtual tokens are attended to from the start
    paper: ClassVar[str] = "P-tuning, arXiv 2103.10385"
    formula: ClassVar[str] = "n·h + encoder (mlp: 2·h·e + e² + 2e + h; lstm: bi-LSTM(h→e, 2 layers) + MLP)"

    num_virtual_tokens: int = config_field(20, "number of virtual tokens n")
    encoder: str = config_field("mlp", "prompt encoder: mlp (HF PEFT, LLM-Adapters) | lstm (the paper)")
    encoder_hidden_size: int = config_field(0, "encoder width e; 0 means the model's hidden size")
    init_token_ids: tuple[int, ...] = config_field((), "token ids to start from (cycled to n); empty: sampled")

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, self.name, "num_virtual_tokens must be positive")
        check(self.encoder in ("mlp", "lstm"), self.name, f"encoder must be mlp or lstm, got {self.encoder!r}")
        check(self.encoder_hidden_size >= 0, self.name, "encoder_hidden_size must be >= 0")
        check(self.targets is None, self.name, "soft prompts take no targets")

    def check_model(self, model: nn.Module) -> None:
        _check_embeddable(model, self.name)

    def build(self, model: nn.Module, restoring: bool = False) -> ModelAdapter:
        initial = _vocab_embeddings(model, self.num_virtual_tokens, self.init_token_ids)
        return PromptEncoderTokens(initial, self.encoder, self.encoder_hidden_size or initial.shape[1])

    def trainable_count_for(self, model_config) -> int:
        h = hf.attention_geometry(model_config)[3]
        e = self.encoder_hidden_size or h
        tokens = self.num_virtual_tokens * h
        if self.encoder == "mlp":
            return tokens + (h * e + e) + (e * e + e) + (e * h + h)
        lstm = 2 * (4 * e * (h + e) + 8 * e) + 2 * (4 * e * (2 * e + e) + 8 * e)
        return tokens + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)


# --------------------------------------------------------------------------------------------------
# Prefix tuning


class PrefixKeyValues(ModelAdapter):
    """Per-layer key/value prefixes, stored directly or produced by an MLP from n embeddings."""

    def __init__(self, shapes: list[torch.Size], initial: list[torch.Tensor] | None, projection: int,
                 embeddings: torch.Tensor):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]  # per layer: (2, kv_heads, n, head_dim)
        self.n = self.shapes[0][2]
        if projection:
            self.inputs = nn.Parameter(embeddings.clone())
            total = sum(torch.Size(s).numel() for s in self.shapes) // self.n
            self.mlp = nn.Sequential(nn.Linear(embeddings.shape[1], projection), nn.Tanh(),
                                     nn.Linear(projection, total))
            self.prefix = None
        else:
            values = initial or [torch.randn(s) for s in self.shapes]
            self.prefix = nn.ParameterList([nn.Parameter(v.clone()) for v in values])

    def per_layer(self) -> list[torch.Tensor]:
        if self.prefix is not None:
            return list(self.prefix)
        flat = self.mlp(self.inputs)  # n x total
        out, start = [], 0
        for two, heads, n, dim in self.shapes:
            width = two * heads * dim
            chunk = flat[:, start:start + width].reshape(n, two, heads, dim).permute(1, 2, 0, 3)
            out.append(chunk)
            start += width
        return out

    def before(self, model, kwargs):
        key = hf.cache_argument(model)
        cache = kwargs.get(key)
        if _continuing(cache):
            return _shift_for_cached(kwargs, self.n), None
        batch = hf.batch_size(kwargs)
        cache = cache if cache is not None else hf.new_cache(model)
        dtype = hf.compute_dtype(model)
        for index, kv in enumerate(self.per_layer()):
            kv = kv.to(dtype).unsqueeze(1).expand(2, batch, *kv.shape[1:])
            cache.update(kv[0], kv[1], index)
        _mark(cache, self.n)
        kwargs[key] = cache
        return _shift_for_cached(kwargs, self.n), None


@register
@dataclass
class Prefix(ModelMethod):
    name: ClassVar[str] = "prefix"
    family: ClassVar[str] = "soft prompt"
    identity_at_init: ClassVar[bool] = False  # virtual tokens are attended to from the start
    paper: ClassVar[str] = "Prefix tuning, arXiv 2101.00190"
    formula: ClassVar[str] = "layers · 2 · n · kv_heads · head_dim (direct); n·h + h·p + p + p·layers·2·kv_dim (MLP)"

    num_virtual_tokens: int = config_field(30, "prefix length n (LLM-Adapters: 30; its math runs use 10)")
    projection: int = config_field(0, "width p of the reparametrisation MLP; 0 trains the prefixes directly")
    init: str = config_field("vocab", "vocab (the model's own K/V of sampled tokens) | random (N(0,1), as HF PEFT)")
    init_token_ids: tuple[int, ...] = config_field((), "token ids for init='vocab' (cycled to n); empty: sampled")

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, self.name, "num_virtual_tokens must be positive")
        check(self.projection >= 0, self.name, "projection must be >= 0")
        check(self.init in ("vocab", "random"), self.name, f"init must be vocab or random, got {self.init!r}")
        check(self.targets is None, self.name, "prefix tuning takes no targets")

    def check_model(self, model: nn.Module) -> None:
        _check_embeddable(model, self.name)
        if hf.cache_argument(model) is None or not self._probe(model, torch.zeros(1, dtype=torch.long)):
            raise TargetError(f"prefix tuning needs a model whose attention reads a KV cache it is given; "
                              f"{type(model).__name__} does not")

    @staticmethod
    def _probe(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
        """The base model's keys and values for ``ids``, per layer, as (2, kv_heads, n, head_dim)."""
        from peftlab.core.api import adapters, disabled

        device = next(model.parameters()).device
        # The cache goes in explicitly: encoders (BERT) use a cache they are given but never make one.
        cache = hf.new_cache(model)
        inputs = {"input_ids": ids[None].to(device), hf.cache_argument(model): cache, "use_cache": True}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if adapters(model):
                    with disabled(model):
                        model(**inputs)
                else:
                    model(**inputs)
        finally:
            model.train(was_training)
        if hf.cache_length(cache) == 0:
            return []
        return [torch.stack([k[0], v[0]]).float() for k, v in hf.cache_layers(cache)]

    def trainable_count_for(self, model_config) -> int:
        layers, kv_heads, head_dim, hidden = hf.attention_geometry(model_config)
        n, per_token = self.num_virtual_tokens, layers * 2 * kv_heads * head_dim
        if not self.projection:
            return n * per_token
        p = self.projection
        return n * hidden + (hidden * p + p) + (p * per_token + per_token)

    def build(self, model: nn.Module, restoring: bool = False) -> ModelAdapter:
        n = self.num_virtual_tokens
        ids = _sample_token_ids(model, n, self.init_token_ids)
        real = self._probe(model, ids)
        initial = real if self.init == "vocab" and not self.projection else None
        embeddings = _vocab_embeddings(model, n, self.init_token_ids) if self.projection else torch.empty(0, 0)
        return PrefixKeyValues([kv.shape for kv in real], initial, self.projection, embeddings)
