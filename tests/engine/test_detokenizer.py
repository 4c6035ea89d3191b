"""IncrementalDetokenizer against tokenizer.decode, with SmolLM2's byte-level BPE tokenizer
(emoji and CJK characters span several byte tokens there) and a tiny SentencePiece-style one."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shardserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Héllo wörld, naïve café, señor, Ångström, ½ ≠ ∞",
    "世界你好，这是一个测试。日本語のテキストも。한국어도.",
    "Party 🎉👍🏽 time! 👨‍👩‍👧‍👦 family, 🇫🇷 flag, ✨✨✨",
    "mixed: a🎉b世c\u00e9d  double  spaces\n\nnewlines\ttabs",
]


class _SlowTokenizer:
    """Only `decode`: forces the pure-Python window path (no backend_tokenizer)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


@pytest.fixture(scope="module")
def tok() -> Any:
    pytest.importorskip("transformers")
    from shardserve.errors import ModelLoadError
    from shardserve.loader.source import default_model_path, resolve_model_source
    from shardserve.tokenizer import load_tokenizer
    try:
        path = default_model_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    # The engine's own load: on older transformers it mends what their GGUF conversion built.
    return load_tokenizer(resolve_model_source(str(path)))


@pytest.fixture(scope="module")
def chat_prompt(tok: Any) -> list[int]:
    return tok.encode("<|im_start|>user\nSay hi 世界<|im_end|>\n<|im_start|>assistant\n")


def _variants(tok: Any) -> list[tuple[str, Any, bool]]:
    return [("stream", tok, True), ("window", tok, False), ("slow", _SlowTokenizer(tok), False)]


def _run(tokenizer: Any, prompt: list[int], ids: list[int], skip: bool = True,
         stop: list[str] | None = None, include: bool = False, use_stream: bool = True,
         chunk: int = 1) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    d = IncrementalDetokenizer(tokenizer, prompt, skip, stop or [], include,
                               use_decode_stream=use_stream)
    deltas, hit = [], None
    for i in range(0, len(ids), chunk):
        hit = d.update(ids[i:i + chunk])
        deltas.append(d.get_next_delta())
        if hit is not None:
            break
    d.finish()
    deltas.append(d.get_next_delta())
    return d, deltas, hit


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_text_round_trips_without_replacement_chars(tok: Any, chat_prompt: list[int], text: str,
                                                    chunk: int) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    for name, tokenizer, use_stream in _variants(tok):
        d, deltas, _ = _run(tokenizer, chat_prompt, ids, use_stream=use_stream, chunk=chunk)
        assert d.output_text == tok.decode(ids, skip_special_tokens=True) == text, name
        assert "".join(deltas) == text, name
        assert all("\ufffd" not in delta for delta in deltas), name


def test_split_character_is_emitted_once_complete(tok: Any) -> None:
    ids = tok.encode("a 🎉", add_special_tokens=False)
    assert len(ids) >= 3  # ' 🎉' spans several byte tokens
    d = IncrementalDetokenizer(tok, [], True, [], False)
    d.update(ids[:1])
    assert d.get_next_delta() == "a"
    for i in ids[1:-1]:
        d.update([i])
        assert d.get_next_delta() == "" and d.output_text == "a"
    d.update(ids[-1:])
    assert d.get_next_delta() == " 🎉"


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_match_decode(tok: Any, chat_prompt: list[int], skip: bool) -> None:
    rng = random.Random(1234)
    vocab = len(tok)
    for trial in range(60):
        # Half byte-level tokens, so invalid and incomplete UTF-8 is common; some specials.
        ids = [rng.randrange(vocab) if rng.random() < 0.5 else rng.randrange(0, 260)
               for _ in range(rng.randrange(1, 30))]
        expected = tok.decode(ids, skip_special_tokens=skip)
        chunks_by_variant = []
        for name, tokenizer, use_stream in _variants(tok):
            prompt = chat_prompt if trial % 2 else []
            d, deltas, _ = _run(tokenizer, prompt, ids, skip=skip, use_stream=use_stream)
            assert d.output_text == expected, (name, ids)
            assert "".join(deltas) == expected, (name, ids)
            chunks_by_variant.append(deltas)
        assert chunks_by_variant[0] == chunks_by_variant[1] == chunks_by_variant[2]


def test_special_tokens(tok: Any) -> None:
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.eos_token_id]
    assert _run(tok, [], ids, skip=True)[0].output_text == "Hi"
    assert _run(tok, [], ids, skip=False)[0].output_text == "Hi" + tok.eos_token
    # Ended by EOS: as in vLLM, the stop token adds no text.
    d = IncrementalDetokenizer(tok, [], False, [], False)
    assert d.update(ids, stop_terminated=True) is None
    assert d.finished and d.output_text == "Hi" and d.get_next_delta() == "Hi"


def test_stop_string_cut(tok: Any) -> None:
    text = "The capital of France is Paris. It is big."
    ids = tok.encode(text, add_special_tokens=False)
    for name, tokenizer, use_stream in _variants(tok):
        d, deltas, hit = _run(tokenizer, [], ids, stop=["Paris", "big"], use_stream=use_stream)
        assert hit == "Paris" and d.stop_string == "Paris" and d.finished, name
        assert d.output_text == "The capital of France is " == "".join(deltas), name
        assert len(d.token_ids) < len(ids)  # tokens after the hit are not consumed
        d, deltas, hit = _run(tokenizer, [], ids, stop=["Paris"], include=True,
                              use_stream=use_stream)
        assert d.output_text == "The capital of France is Paris" == "".join(deltas), name


def test_stop_string_inside_one_token_and_across_tokens(tok: Any) -> None:
    ids = tok.encode("hello world", add_special_tokens=False)
    d, deltas, hit = _run(tok, [], ids, stop=["ell"])  # inside the first token
    assert hit == "ell" and d.output_text == "h" == "".join(deltas)
    d, deltas, hit = _run(tok, [], ids, stop=["o w"])  # spans the token boundary
    assert hit == "o w" and d.output_text == "hell"
    d, _, hit = _run(tok, [], ids, stop=["orl", "lo w"])  # the earliest match wins
    assert hit == "lo w" and d.output_text == "hel"


def test_stop_string_ignored_within_min_tokens(tok: Any) -> None:
    """vLLM's rule: a stop string counts only if it ends after the first min_tokens tokens'
    text, so it may start inside them."""
    ids = tok.encode("The capital of France is Paris. The capital is big.", add_special_tokens=False)
    first = len(tok.encode("The capital", add_special_tokens=False))
    for name, tokenizer, use_stream in _variants(tok):
        d = IncrementalDetokenizer(tokenizer, [], True, ["capital"], False,
                                   use_decode_stream=use_stream, min_tokens=first)
        assert d.update(ids) == "capital", name  # the second "capital"
        assert d.output_text == "The capital of France is Paris. The ", name
        d = IncrementalDetokenizer(tokenizer, [], True, ["The capital of"], False,
                                   use_decode_stream=use_stream, min_tokens=first)
        assert d.update(ids) == "The capital of" and d.output_text == "", name  # ends later


def test_stop_string_with_split_characters(tok: Any) -> None:
    ids = tok.encode("I like 世界 and 🎉 parties", add_special_tokens=False)
    d, deltas, hit = _run(tok, [], ids, stop=["🎉"])
    assert hit == "🎉" and d.output_text == "I like 世界 and " == "".join(deltas)


def test_stream_holds_back_possible_stop_prefix(tok: Any) -> None:
    text = "one two three four abc"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, ["abcd!"], False)
    sent = ""
    for i in ids:
        assert d.update([i]) is None
        sent += d.get_next_delta()
        # Never more than output_text minus the last len(stop) - 1 characters.
        assert d.output_text.startswith(sent)
        assert len(sent) == max(0, len(d.output_text) - 4)
        assert d.streamable_text == sent
    assert sent == text[:-4]
    d.finish()  # no stop after all: the held text is released
    assert sent + d.get_next_delta() == text
    assert d.get_next_delta() == ""


def test_no_stop_strings_streams_everything(tok: Any) -> None:
    ids = tok.encode("abc def", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, [], False)
    d.update(ids)
    assert d.get_next_delta() == "abc def"


def test_updates_after_finish_are_ignored(tok: Any) -> None:
    ids = tok.encode("stop here and more", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, ["here"], False)
    assert d.update(ids) == "here"
    assert d.update(tok.encode(" extra", add_special_tokens=False)) is None
    assert d.output_text == "stop "


def _metaspace_tokenizer() -> Any:
    """A tiny sentencepiece-style (Metaspace) tokenizer: not byte-level."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁the": 3, "!": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_prompt_context_keeps_sentencepiece_leading_space() -> None:
    """Metaspace decoders drop the leading space of the first token of a decode; the first
    output token follows the prompt, so its space is real text."""
    tok = _metaspace_tokenizer()
    for use_stream in (True, False):
        d, deltas, _ = _run(tok, [1, 2, 3, 1], [2, 4, 3], use_stream=use_stream)
        assert d.output_text == " world! the" == "".join(deltas)
        d, _, _ = _run(tok, [], [2, 4, 3], use_stream=use_stream)
        assert d.output_text == "world! the" == tok.decode([2, 4, 3])


# ---- lazy sequences (the offline LLM: text read only at the end) ----------------------------

def _lazy_vs_eager(tokenizer: Any, prompt: list[int], ids: list[int], skip: bool,
                   use_stream: bool = True, stop: list[str] | None = None,
                   chunk: int = 1) -> tuple[IncrementalDetokenizer, IncrementalDetokenizer]:
    eager = IncrementalDetokenizer(tokenizer, prompt, skip, stop, use_decode_stream=use_stream)
    lazy = IncrementalDetokenizer(tokenizer, prompt, skip, stop, use_decode_stream=use_stream,
                                  lazy=True)
    for i in range(0, len(ids), chunk):
        hits = (eager.update(ids[i:i + chunk]), lazy.update(ids[i:i + chunk]))
        assert hits[0] == hits[1]
        if hits[0] is not None:
            break
    eager.finish()
    lazy.finish()
    return eager, lazy


@pytest.mark.parametrize("skip", [True, False])
def test_lazy_matches_eager_on_random_tokens(tok: Any, chat_prompt: list[int], skip: bool) -> None:
    """The one-decode shortcut at the end (byte-level BPE) gives the stepped text exactly,
    invalid and incomplete UTF-8 and special tokens included."""
    rng = random.Random(99)
    vocab = len(tok)
    for trial in range(200):
        ids = [rng.randrange(vocab) if rng.random() < 0.5 else rng.randrange(0, 260)
               for _ in range(rng.randrange(0, 80))]
        prompt = [chat_prompt, [], [rng.randrange(0, 260) for _ in range(9)]][trial % 3]
        for name, tokenizer, use_stream in _variants(tok):
            eager, lazy = _lazy_vs_eager(tokenizer, prompt, ids, skip, use_stream, chunk=1 + trial % 3)
            assert lazy.output_text == eager.output_text, (name, prompt, ids)
            assert lazy.token_ids == eager.token_ids
            assert lazy.get_next_delta() == eager.get_next_delta()


def test_lazy_collects_ids_without_decoding(tok: Any, monkeypatch) -> None:
    ids = tok.encode("Héllo 世界 🎉 and more", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, lazy=True)
    calls = []
    real_step = d._decoder.step
    monkeypatch.setattr(d._decoder, "step", lambda t: calls.append(t) or real_step(t))
    for i in ids:
        assert d.update([i]) is None
    assert d.token_ids == [] and not calls  # nothing decoded per step
    d.finish()
    assert d.output_text == "Héllo 世界 🎉 and more" and d.token_ids == ids
    assert not calls  # one decode of the whole output


def test_lazy_read_before_the_end_catches_up(tok: Any) -> None:
    """Reading the text early (an abort emits it) decodes what was collected; later ids
    continue from there."""
    ids = tok.encode("one two three", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, lazy=True)
    d.update(ids[:2])
    assert d.output_text == tok.decode(ids[:2])
    d.update(ids[2:])
    d.finish()
    assert d.output_text == "one two three" and d.get_next_delta() == "one two three"


def test_lazy_ended_by_eos(tok: Any) -> None:
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.eos_token_id]
    d = IncrementalDetokenizer(tok, [], False, lazy=True)
    assert d.update(ids, stop_terminated=True) is None
    assert d.finished and d.output_text == "Hi"


def test_lazy_with_stop_strings_still_decodes_as_it_goes(tok: Any) -> None:
    ids = tok.encode("The capital of France is Paris. It is big.", add_special_tokens=False)
    eager, lazy = _lazy_vs_eager(tok, [], ids, True, stop=["Paris"])
    assert lazy.stop_string == eager.stop_string == "Paris"
    assert lazy.output_text == eager.output_text == "The capital of France is "


def test_lazy_sentencepiece_falls_back_to_stepping() -> None:
    """Not byte-level: the shortcut is not taken, the ids are stepped through at the end."""
    tok = _metaspace_tokenizer()
    eager, lazy = _lazy_vs_eager(tok, [1, 2, 3, 1], [2, 4, 3], True)
    assert lazy.output_text == eager.output_text == " world! the"


# ---- spaces_between_special_tokens (vLLM's) ---------------------------------------------------

@pytest.fixture(scope="module")
def wordpiece_tok() -> Any:
    """A fast tokenizer whose decoder puts a space before every word (WordPiece's, as BERT's),
    added tokens included: the case vLLM's spaces_between_special_tokens=False changes."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = ["[UNK]", "hello", "world", "the", "end"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<s1>", "<s2>"]})
    tok.add_tokens(["<t>"])  # added, not special: skip_special_tokens keeps it
    return tok


class _PythonTokenizer(_SlowTokenizer):
    """A slow tokenizer's token-level interface (what vLLM's slow detokenizer reads)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("get_added_vocab", "convert_ids_to_tokens", "convert_tokens_to_string",
                    "all_special_tokens"):
            return getattr(self._tok, name)
        raise AttributeError(name)


def _texts(tok: Any, ids: list[int], skip: bool, spaces: bool) -> list[str]:
    """output_text per path: stream, window, lazy (decoded at the end), streamed deltas."""
    prompt = tok.encode("the end", add_special_tokens=False)
    texts = []
    for use_stream, lazy in ((True, False), (False, False), (True, True)):
        d = IncrementalDetokenizer(tok, prompt, skip, use_decode_stream=use_stream, lazy=lazy,
                                   spaces_between_special_tokens=spaces)
        deltas = []
        for tid in ids:
            d.update([tid])
            deltas.append(d.get_next_delta())
        d.finish()
        deltas.append(d.get_next_delta())
        texts += [d.output_text, "".join(deltas)]
    return texts


def test_spaces_between_special_tokens_fast(wordpiece_tok: Any) -> None:
    """vLLM's fast-tokenizer rule: True (the default) keeps the decoder's text; False gives an
    added token that follows another added token as its bare text (no space before it); with
    skip_special_tokens it makes no difference. The same on every path."""
    tok = wordpiece_tok
    ids = tok.encode("hello <s1><s2> world <t><s1> the end <s2>", add_special_tokens=False)
    spaced = " hello <s1> <s2> world <t> <s1> the end <s2>"
    assert set(_texts(tok, ids, skip=False, spaces=True)) == {spaced}
    assert set(_texts(tok, ids, skip=False, spaces=False)) == {
        " hello <s1><s2> world <t><s1> the end <s2>"}
    assert set(_texts(tok, ids, skip=True, spaces=False)) == \
        set(_texts(tok, ids, skip=True, spaces=True)) == {" hello world <t> the end"}


def test_spaces_between_special_tokens_slow(wordpiece_tok: Any) -> None:
    """vLLM's slow-tokenizer rule: runs of ordinary tokens and each added token are pieces,
    joined by spaces (True) or by nothing (False); skipped special tokens are no pieces."""
    tok = _PythonTokenizer(wordpiece_tok)
    ids = wordpiece_tok.encode("hello <s1><s2> world the <t>", add_special_tokens=False)
    for use_stream in (True, False):
        d = IncrementalDetokenizer(tok, [], False, use_decode_stream=use_stream,
                                   spaces_between_special_tokens=False)
        d.update(ids)
        d.finish()
        assert d.output_text == "hello<s1><s2>world the<t>"
    d = IncrementalDetokenizer(tok, [], True, spaces_between_special_tokens=True)
    d.update(ids)
    d.finish()
    assert d.output_text == "hello world the <t>"
