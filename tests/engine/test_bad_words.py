"""bad_words as vLLM tokenizes and applies them (SmolLM2's byte-level BPE tokenizer)."""

from __future__ import annotations

import pytest

from shardserve.engine.bad_words import banned_last_tokens, bad_words_token_ids, needs_history
from shardserve.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_both_tokenizations_of_a_word(tokenizer):
    """"New York" at the start of the text and after a space ("ĠNew" differs from "New")."""
    got = bad_words_token_ids(tokenizer, ["New York"], len(tokenizer))
    assert got == [enc(tokenizer, "New York"), enc(tokenizer, " New York")]
    assert got[0][0] != got[1][0] and got[0][1:] == got[1][1:]
    # A leading space in the word is stripped first: the same two sequences.
    assert bad_words_token_ids(tokenizer, [" New York"], len(tokenizer)) == got


def test_space_form_of_another_length_is_left_out(tokenizer):
    """vLLM keeps the space form only when it has as many tokens as the plain one: here
    "Ultrasound" is two tokens and " Ultrasound" one."""
    assert len(enc(tokenizer, "Ultrasound")) != len(enc(tokenizer, " Ultrasound"))
    assert bad_words_token_ids(tokenizer, ["Ultrasound"], len(tokenizer)) == [
        enc(tokenizer, "Ultrasound")]


def test_refusals(tokenizer):
    with pytest.raises(InvalidRequestError, match="no tokens") as err:
        bad_words_token_ids(tokenizer, ["   "], len(tokenizer))
    assert err.value.param == "bad_words"
    # Ids the tokenizer knows but the model's logits do not have.
    with pytest.raises(InvalidRequestError, match="outside the model's vocabulary") as err:
        bad_words_token_ids(tokenizer, ["Paris"], 100)
    assert err.value.param == "bad_words"
    with pytest.raises(InvalidRequestError, match="at most"):
        bad_words_token_ids(tokenizer, [f"w{i}" for i in range(200)], len(tokenizer))


def test_banned_last_tokens_reads_only_the_outputs():
    words = [[7], [3, 4], [5, 6, 8]]
    prompt = [5, 6]
    # A one-token word is always banned; a longer one when its start ends the outputs.
    assert banned_last_tokens(words, prompt, 2) == [7]  # the prompt's 5, 6 do not count
    assert banned_last_tokens(words, prompt + [3], 2) == [7, 4]
    assert banned_last_tokens(words, prompt + [1, 5, 6], 2) == [7, 8]
    assert banned_last_tokens(words, prompt + [5, 6, 3], 2) == [7, 4]
    assert banned_last_tokens([[3, 4]], [3], 0) == [4]
    assert needs_history(words) and not needs_history([[7], [9]]) and not needs_history(None)
