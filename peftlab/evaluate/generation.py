"""Batched generation for evaluation: greedy (or beam) decoding with left padding and the KV cache.

Prompts are tokenised once and sorted by length, longest first: prompts of similar length share a
batch, so little compute goes to padding, and the largest batch runs first, so an out-of-memory error
comes at once instead of at the end. Each batch is left padded by hand: every prompt then ends in the
last column, where decoding continues, the attention mask hides the pads and transformers derives
the position ids from the mask, so a padded prompt is continued exactly as it would be alone
(tests/test_evaluate.py checks this on a tiny Llama). Padding by hand also means the tokenizer is
never modified: no pad token is set on it and its padding side is left alone.

Only the new tokens are decoded, up to the first EOS, without special tokens; outputs come back in
the order of the prompts. Decoder-only models (the ``generate`` of a causal LM).

LLM-Adapters evaluates the math sets one prompt at a time with 4 beams and no KV cache, and the
commonsense sets in batches with 4 beams. Greedy decoding in batches is much faster; ``num_beams=4``
is there for a closer comparison with its numbers. Prompts are tokenised with the tokenizer's default
special tokens (Llama's BOS, for one), as LLM-Adapters does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from peftlab.core.errors import PeftlabError


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
) -> list[str]:
    """The continuation of each prompt (new text only), in the order of ``prompts``."""
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError("batch_size, max_new_tokens and num_beams must be at least 1")
    token_ids = _tokenize(tokenizer, prompts)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    outputs: list[str | None] = [None] * len(token_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc="generating", unit="prompt",
                                          disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                texts = _generate_batch(model, tokenizer, [token_ids[i] for i in batch], pad_id, eos_ids,
                                        max_new_tokens=max_new_tokens, num_beams=num_beams)
                for i, text in zip(batch, texts, strict=True):
                    outputs[i] = text
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


def _tokenize(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    token_ids = tokenizer(list(prompts))["input_ids"] if prompts else []
    for i, ids in enumerate(token_ids):
        if not ids:
            raise PeftlabError(f"prompt {i} is empty after tokenisation; there is nothing to continue")
    return token_ids


def _eos_ids(model, tokenizer) -> list[int]:
    """The token ids that end a response: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    # Pads are masked out, so any id with an embedding row works; many causal LM tokenizers have no
    # pad token, and EOS is the customary stand-in.
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_ids[0] if eos_ids else 0


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generate_batch(model, tokenizer, sequences, pad_id, eos_ids, *, max_new_tokens, num_beams) -> list[str]:
    input_ids, attention_mask = _left_pad(sequences, pad_id, _device_of(model))
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        use_cache=True,  # a model trained with gradient checkpointing may have config.use_cache False
    )
    new_tokens = generated[:, input_ids.shape[1]:].tolist()
    return tokenizer.batch_decode([_until_eos(t, eos_ids) for t in new_tokens], skip_special_tokens=True)


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    # generate fills finished rows with pad_token_id, which need not be a special token: cut at EOS
    # ourselves rather than rely on skip_special_tokens.
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device
