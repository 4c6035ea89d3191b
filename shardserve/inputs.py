"""Prompt types with vLLM's names (vllm.inputs): what LLM.generate and LLMEngine.add_request take.

Plain dicts at run time; the TypedDicts only document the keys (text-only: no
multi_modal_data, which the input processor refuses)."""

from __future__ import annotations

from typing import Any, TypedDict


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine (with the tokenizer's special tokens)."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):  # total=False: prompt may be left out (3.10 too)
    """A prompt already tokenized; prompt, if given, is only reported back in
    RequestOutput.prompt."""

    prompt: str


PromptType = str | TextPrompt | TokensPrompt | dict[str, Any]
