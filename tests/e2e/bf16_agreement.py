"""Shared by the bf16 agreement tests against transformers (CPU: test_bf16_agreement_cpu.py;
GPU: tests/gpu/test_bf16_smollm2.py): the prompts, transformers' bf16 SmolLM2, and the measures.

Why two ways of serving the prompts. In bf16, SmolLM2's logits near 30 are multiples of 0.125,
so the top two often tie exactly and any last-bit difference upstream decides the token. Matrix
products round differently with the number of rows (the BLAS picks another kernel or blocking),
so the same prompt gives slightly different hidden states alone and inside a batch — in
transformers as much as here: on the CPU, transformers' own batched generate() agrees with its
one-prompt-at-a-time greedy for only 9 of 16 prompts (16 tokens). So:

- one request at a time, prefix caching off (the same matrix shapes as transformers' loop):
  agreement measures our arithmetic, and a mismatch in rounding order shows (on the CPU, 11 of
  16 with the old attention call, 16 of 16 now);
- batched: agreement is bounded by batching noise whatever the rounding order (9 to 11 of 16 on
  the CPU before and after), so it is reported, not asserted.
"""

from __future__ import annotations

import os

import torch

TOPICS = ["the sea", "mountains", "a cat", "coffee", "the moon", "trains", "music", "rain",
          "a library", "gardens", "winter", "bread"]
TEMPLATES = ["Write one sentence about {}.", "What is interesting about {}?",
             "Give me a short fact about {}.", "Describe {} in simple words.",
             "Why do people like {}?", "Tell a very short story about {}."]


def chat_prompts(tokenizer, num: int) -> list[list[int]]:
    """The first `num` questions (template-major), as chat-templated token ids."""
    from shardserve.tokenizer import apply_chat_template
    questions = [t.format(topic) for t in TEMPLATES for topic in TOPICS][:num]
    return [apply_chat_template(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def hf_bf16_smollm2(gguf_path: str, device: str):
    """transformers' own load of the SmolLM2 GGUF, in bf16 on `device`."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    return model.to(device).eval()


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)


@torch.inference_mode()
def hf_batched_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' generate() over all prompts at once (left-padded), EOS masked out: what
    transformers' own batching does to its greedy continuations."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over all elements (float64)."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()
