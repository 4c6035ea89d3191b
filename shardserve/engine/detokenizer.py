"""Incremental detokenization with stop strings, for streaming.

Token ids arrive a few at a time; text must come out as soon as it is final and never twice:

    window:  [ ids of the last emitted chunk | ids not emitted yet ]
                                             ^read_offset
    new text = text(window) minus text(window[:read_offset]),
    unless it ends in U+FFFD: a character whose UTF-8 bytes span tokens is still incomplete,
    so nothing is emitted until a later token completes it (vLLM's prefix/read offsets).
    After emitting, the window drops the older chunk and starts at the tokens just read.

Decoding a short window, not the whole output, keeps each step O(1); starting it on the
previous chunk (and on a few prompt tokens at first) keeps decoders that look at neighbours,
such as SentencePiece's leading-space rule, right. Fast tokenizers step through tokenizers'
own DecodeStream (the same rule, in Rust); the offsets are mirrored here so that text still
held when the request ends can be flushed, and so a DecodeStream error falls back to the
Python window without losing state.

Stop strings: only the new text plus a tail of len(stop) - 1 characters is searched; for the
same reason a stream holds back the last len(longest stop) - 1 characters until it is sure
they do not start a stop string.

Lazy sequences (the offline LLM, which reads text only when a request ends): without stop
strings nothing needs the text earlier, so ids are only collected, at no cost per step, and
decoded when the text is first read. At the end of a byte-level BPE sequence that is one
decode of the whole output (see `_TokenDecoder.decode_all`) instead of two per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None  # type: ignore[assignment,misc]
try:
    from tokenizers.decoders import ByteLevel as _ByteLevelDecoder
except ImportError:  # pragma: no cover - no tokenizers at all
    _ByteLevelDecoder = None  # type: ignore[assignment,misc]

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output as context: at least a few (so neighbour-sensitive
# decoders see a real left neighbour), at most this many while looking for a clean cut.
_MIN_CONTEXT, _MAX_CONTEXT = 4, 24


class _TokenDecoder:
    """Turns token ids into text increments (see the module docstring)."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int], skip_special_tokens: bool,
                 use_decode_stream: bool, spaces_between_special_tokens: bool = True) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust decode: what tokenizer.decode does for fast tokenizers, minus Python.
            self._decode: Callable[[list[int]], str] = (
                lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens))
        else:
            self._decode = lambda ids: _slow_decode(tokenizer, ids, skip_special_tokens,
                                                    spaces_between_special_tokens)
        # vLLM's spaces_between_special_tokens=False for fast tokenizers: an added token right
        # after another comes out as its bare text, without the space a decoder such as
        # WordPiece's (or none: tokens joined by spaces) puts before it. On by default, and
        # moot when special tokens are skipped, as in vLLM. {id: text} of the added tokens,
        # or None when the rule does not apply.
        self._added_texts: dict[int, str] | None = None
        if backend is not None and not skip_special_tokens and not spaces_between_special_tokens:
            self._added_texts = {tid: token.content for tid, token
                                 in backend.get_added_tokens_decoder().items()} or None
        self._last_added = False
        # The window: ids[:read_offset] were emitted already (the prefix), the rest not yet.
        self._ids = list(context_ids)
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # text of ids[:read_offset]; decoded on demand
        self._backend = backend
        self._stream = None
        if use_decode_stream and backend is not None and DecodeStream is not None:
            self._stream = _new_stream(backend, self._ids, skip_special_tokens)
        self._stepped = False

    def decode_all(self, ids: list[int]) -> str | None:
        """What stepping through `ids` and then flushing returns in total, in one decode, for a
        fresh decoder; None where that shortcut is not known to give the same text.

        Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) decodes to the tokens' bytes
        concatenated, read as UTF-8 with each invalid sequence replaced by U+FFFD. The stream
        cuts only where the text so far does not end in U+FFFD, that is after a complete
        character, where such decoding of what follows does not depend on what came before;
        the context decodes cleanly too. So the pieces add up to
        decode(context + ids) minus decode(context)."""
        if (self._stepped or self._stream is None or _ByteLevelDecoder is None
                or self._added_texts is not None
                or not isinstance(self._backend.decoder, _ByteLevelDecoder)):
            return None
        context = self._ids[:self._read_offset]
        prefix = self._decode(context)
        text = self._decode(context + ids)
        if not text.startswith(prefix):
            return None
        self._ids.extend(ids)
        self._stream = None  # flushed: nothing more comes
        return text[len(prefix):]

    def step(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        chunk = self._step(token_id)
        if self._added_texts is not None:
            text = self._added_texts.get(token_id)
            if text is not None and self._last_added:
                chunk = text  # no space between two added tokens (see __init__)
            self._last_added = text is not None
        return chunk

    def _step(self, token_id: int) -> str:
        self._stepped = True
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, token_id)
            except Exception:  # "Invalid prefix": odd byte sequences; the window copes
                self._stream = None
            else:
                if chunk is not None:
                    self._advance()
                return chunk or ""
        return self._window_step(final=False)

    def flush(self) -> str:
        """The request ended: whatever is held (an incomplete character decodes to U+FFFD)."""
        self._stream = None
        return self._window_step(final=True)

    def _window_step(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read_offset])
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        new_text = text[len(self._prefix_text):]
        self._advance()
        return new_text

    def _advance(self) -> None:
        # Everything up to here is emitted: the next window starts at the tokens just read
        # (older ids are dropped, so the window stays a few tokens long).
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = None


def _new_stream(backend: Any, context_ids: list[int], skip_special_tokens: bool) -> Any:
    try:
        return DecodeStream(ids=context_ids, skip_special_tokens=skip_special_tokens)
    except TypeError:  # versions without `ids`: prime by stepping through the context
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for tid in context_ids:
            stream.step(backend, tid)
        return stream


def _prompt_context(tokenizer: Any, prompt_token_ids: Sequence[int],
                    skip_special_tokens: bool) -> list[int]:
    """The shortest prompt suffix of at least _MIN_CONTEXT tokens that decodes cleanly (no
    U+FFFD: it neither starts nor ends inside a character); none if no such suffix."""
    n = len(prompt_token_ids)
    if n <= _MIN_CONTEXT:
        suffix = list(prompt_token_ids)
        return suffix if _REPLACEMENT not in _decode(tokenizer, suffix, skip_special_tokens) else []
    for i in range(_MIN_CONTEXT, min(n, _MAX_CONTEXT) + 1):
        suffix = list(prompt_token_ids[-i:])
        if _REPLACEMENT not in _decode(tokenizer, suffix, skip_special_tokens):
            return suffix
    return []


def _slow_decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool) -> str:
    """A Python (slow) tokenizer's text the way vLLM's detokenizer makes it: the runs of
    ordinary tokens decoded, each added token as its own text, and the pieces joined by spaces
    if spaces_between_special_tokens (the old transformers convention), else by nothing."""
    added = getattr(tokenizer, "get_added_vocab", None)
    added = added() if added is not None and hasattr(tokenizer, "convert_tokens_to_string") \
        else None
    if not added:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_tokens) if skip_special_tokens else set()
    pieces: list[str] = []
    run: list[str] = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token is None or token in special:
            continue
        if token in added:
            if run:
                pieces.append(tokenizer.convert_tokens_to_string(run))
                run = []
            pieces.append(token)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.convert_tokens_to_string(run))
    return (" " if spaces_between_special_tokens else "").join(pieces)


def _decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """One sequence's text: feed it token ids with `update`, read `output_text` (everything so
    far, cut at a stop string) or `get_next_delta()` (what a stream may send now).

    After all tokens and `finish()`, `output_text` equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)` (cut at a stop string), except that
    the first output token is decoded with the prompt as left context, which matters only for
    tokenizers whose decoding depends on the neighbour (SentencePiece's leading space), and
    that `clean_up_tokenization_spaces` is not applied.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] | None = None,
                 include_stop_str_in_output: bool = False, *,
                 use_decode_stream: bool = True, lazy: bool = False, min_tokens: int = 0,
                 spaces_between_special_tokens: bool = True) -> None:
        """lazy: the text is read only when the request ends (see the module docstring); with
        stop strings it is decoded as it comes all the same. min_tokens: as in vLLM, a stop
        string counts only if it ends after the text of the first min_tokens tokens.
        spaces_between_special_tokens: vLLM's (see _TokenDecoder and _slow_decode)."""
        context = _prompt_context(tokenizer, prompt_token_ids, skip_special_tokens)
        self._decoder = _TokenDecoder(tokenizer, context, skip_special_tokens, use_decode_stream,
                                      spaces_between_special_tokens)
        self._stop = [s for s in (stop or ()) if s]
        self._lazy = lazy and not self._stop
        self._pending: list[int] = []  # lazy: ids not decoded yet
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        # Characters a stream holds back: the longest text that could still grow into a stop.
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""
        self._num_sent = 0
        self.token_ids: list[int] = []  # ids consumed (none after a stop string)
        self.stop_string: str | None = None
        self.finished = False

    @property
    def output_text(self) -> str:
        if self._pending:
            self._catch_up()
        return self._text

    @property
    def streamable_text(self) -> str:
        """output_text without the tail that may still become a stop string."""
        if self._pending:
            self._catch_up()
        return self._text[:self._stream_limit()]

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Decode new ids; return the stop string if one appeared (the rest is then ignored).

        stop_terminated: the last id is the EOS / stop token that ended the request; as in
        vLLM it adds no text unless include_stop_str_in_output, and the request finishes.
        """
        if self.finished:
            return None
        ids = list(new_token_ids)
        if stop_terminated and not self._include_stop and ids:
            ids = ids[:-1]
        if self._lazy:
            # No stop strings: nothing to find in the text, so it can wait (see the module doc).
            self._pending.extend(ids)
            if stop_terminated:
                self.finish()
            return None
        if self._step_through(ids):
            return self.stop_string
        if stop_terminated:
            self.finish()
        return None

    def _step_through(self, ids: Sequence[int]) -> bool:
        """Decode ids one by one into the text; True when a stop string ended it."""
        for tid in ids:
            self.token_ids.append(tid)
            delta = self._decoder.step(tid)
            if delta and self._append(delta, search=len(self.token_ids) > self._min_tokens):
                return True
        return False

    def finish(self) -> None:
        """The request ended without a stop string: flush held bytes and release held text."""
        if self.finished:
            return
        if self._pending and not self.token_ids:
            whole = self._decoder.decode_all(self._pending)
            if whole is not None:
                self.token_ids, self._pending = self._pending, []
                self._text = whole
                self.finished = True
                return
        if self._pending:
            self._catch_up()
        tail = self._decoder.flush()
        if tail:
            self._append(tail)
        self.finished = True

    def _catch_up(self) -> None:
        """Decode the ids a lazy sequence collected, one by one as `update` would have (a
        lazy sequence has no stop strings, so nothing ends it early)."""
        ids, self._pending = self._pending, []
        self._step_through(ids)

    def get_next_delta(self) -> str:
        """Text added since the last call that can no longer turn into a stop string."""
        if self._pending:
            self._catch_up()
        limit = self._stream_limit()
        if limit <= self._num_sent:
            return ""
        delta = self._text[self._num_sent:limit]
        self._num_sent = limit
        return delta

    def _stream_limit(self) -> int:
        return len(self._text) if self.finished else max(0, len(self._text) - self._hold)

    def _append(self, delta: str, search: bool = True) -> bool:
        """Add text; on a stop string (searched for only if `search`) cut the text there,
        finish, and return True."""
        old_len = len(self._text)
        self._text += delta
        if not search:
            return False
        best: tuple[int, str] | None = None
        for stop in self._stop:
            # Earlier text was searched already: start where a stop could still overlap it.
            at = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self._text = self._text[:at + len(stop) if self._include_stop else at]
        self.stop_string = stop
        self.finished = True
        return True
