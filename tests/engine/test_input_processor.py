"""shardserve/engine/input_processor.py: prompts checked against the model before they reach
the engine core."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shardserve.engine.input_processor import InputProcessor
from shardserve.errors import InvalidRequestError


def _processor(vocab_size: int) -> InputProcessor:
    from transformers import AutoTokenizer

    from shardserve.testing import _default_gguf, cached_gguf_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(cached_gguf_tokenizer_dir(_default_gguf())))
    model_config = SimpleNamespace(max_model_len=64, hf_config=SimpleNamespace(vocab_size=vocab_size))
    return InputProcessor(SimpleNamespace(model_config=model_config), tokenizer, [2])


@pytest.mark.parametrize("prompt", ["Hello world, this is a test",
                                    {"prompt": "Hello world, this is a test"}])
def test_text_the_model_has_no_embedding_for_is_refused(prompt) -> None:
    """A tokenizer larger than the model's vocabulary (one copied from another model) gives
    ids the embedding lacks: a 400 naming the cause, not an IndexError in the engine core
    that takes the server down."""
    ids = _processor(49152).process_prompt(prompt).prompt_token_ids
    assert max(ids) >= 500
    with pytest.raises(InvalidRequestError, match=r"beyond the model's vocab_size 500.*--tokenizer") as err:
        _processor(500).process_prompt(prompt)
    assert err.value.param == "prompt"


@pytest.mark.parametrize("ids", [[1, 500], [-1, 3], [3, True], [2.0, 3], ["7"]],
                         ids=["past_vocab", "negative", "bool", "float", "text"])
def test_bad_token_ids_are_refused(ids) -> None:
    with pytest.raises(InvalidRequestError, match=r"integers in \[0, 500\)") as err:
        _processor(500).process_prompt({"prompt_token_ids": ids})
    assert err.value.param == "prompt"


def test_token_ids_plain_and_numpy() -> None:
    """Plain ints (the range checked in C) and numpy integers (converted) give the same list."""
    import numpy as np

    processor = _processor(500)
    plain = processor.process_prompt({"prompt_token_ids": [0, 7, 499]}).prompt_token_ids
    from_numpy = processor.process_prompt({"prompt_token_ids": np.array([0, 7, 499])})
    mixed = processor.process_prompt({"prompt_token_ids": [np.int64(0), 7, 499]})
    assert plain == from_numpy.prompt_token_ids == mixed.prompt_token_ids == [0, 7, 499]
    assert all(type(t) is int for t in mixed.prompt_token_ids)
