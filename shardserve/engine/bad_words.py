"""vLLM's bad_words: words a request must not generate, as token id sequences.

A word is banned by its last token: that token may not be sampled when the tokens before it in
the word are the last ones generated (a one-token word is banned outright). Only generated
tokens count, never the prompt, as in vLLM.

Each word is tokenized twice, as vLLM does, so it is banned both where it starts the text and
after a space: "fox" -> [fox], and " fox" -> [Ġfox] when the leading space makes a different
first token and the same number of tokens (otherwise the space form would ban a different
word's tail, so it is left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardserve.errors import InvalidRequestError

MAX_NUM_BAD_WORDS = 128  # token sequences per request, after tokenization (vLLM's default)


def bad_words_token_ids(tokenizer: Any, words: Sequence[str], vocab_size: int) -> list[list[int]]:
    """The token id sequences of `words` (vLLM's SamplingParams.update_from_tokenizer)."""
    out: list[list[int]] = []
    for word in words:
        plain = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            raise InvalidRequestError(f"bad_words entry {word!r} tokenizes to no tokens; every "
                                      "entry must hold some text.", "bad_words")
        out.append(plain)
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    if len(out) > MAX_NUM_BAD_WORDS:
        raise InvalidRequestError(f"bad_words make {len(out)} token sequences; at most "
                                  f"{MAX_NUM_BAD_WORDS} are allowed.", "bad_words")
    outside = sorted({t for ids in out for t in ids if not 0 <= t < vocab_size})
    if outside:
        raise InvalidRequestError(f"bad_words tokenize to ids outside the model's vocabulary "
                                  f"[0, {vocab_size}): {outside[:5]}.", "bad_words")
    return out


def banned_last_tokens(words_ids: Sequence[Sequence[int]], token_ids: Sequence[int],
                       num_prompt_tokens: int = 0) -> list[int]:
    """The token ids that would complete a bad word next, after `token_ids` (prompt, then the
    outputs: only outputs may hold a word's start)."""
    banned = []
    num_tokens = len(token_ids)
    for ids in words_ids:
        prefix_len = len(ids) - 1
        if prefix_len > num_tokens - num_prompt_tokens:
            continue
        if prefix_len == 0 or list(token_ids[num_tokens - prefix_len:]) == list(ids[:-1]):
            banned.append(ids[-1])
    return banned


def needs_history(words_ids: Sequence[Sequence[int]] | None) -> bool:
    """Whether the ban depends on earlier outputs (a word of several tokens)."""
    return any(len(ids) > 1 for ids in words_ids or ())
