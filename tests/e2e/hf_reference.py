"""Greedy continuations and logits from Hugging Face transformers, one prompt at a time."""

from __future__ import annotations

import inspect

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache, never stopping at EOS (the engine
    side runs with ignore_eos). generate()'s min_new_tokens would instead mask EOS out."""
    device = next(model.parameters()).device
    # Logits of the last prompt position only, as generate() asks for them: in half precision
    # the LM head's matrix product for one row can round differently from the same row inside
    # a product over the whole prompt, and the engine, too, computes just that row.
    parameters = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True, **keep)
    # transformers 5.2x renamed the cache argument past_key_values -> cache (the old name goes
    # in 5.40); the GPU image has an older 5.x.
    name = "cache" if "cache" in parameters else "past_key_values"
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), use_cache=True,
                    **{name: getattr(out, name)})
    return tokens


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()
