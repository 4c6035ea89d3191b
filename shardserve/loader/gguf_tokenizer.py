"""How a GGUF's byte-level BPE tokenizer splits text before BPE: the pre-tokenizer (and the
normalizer and merge rule that go with it) of the model's original Hugging Face tokenizer.json.

A GGUF carries the vocabulary and the merges, but names the splitting rule only by a label,
`tokenizer.ggml.pre`, which llama.cpp's converter picks by hashing what the original tokenizer
makes of a test text. transformers rebuilds the BPE from the file and knows the rule of some
labels; for the others, DeepSeek's among them, it keeps GPT-2's regex, and the ids differ from the
original tokenizer's wherever the two rules cut differently:

    "12345678"  deepseek-v3 (original): 123 | 456 | 78     GPT-2's rule: 12345678
    "你好world"  deepseek-llm (original): 你好 | world     GPT-2's rule: 你好world

So for the labels of the families we serve (Llama, Qwen, DeepSeek) we set the original's
components ourselves, whatever transformers did. Each entry below follows the original model's
tokenizer.json (a Sequence of Split / Digits stages, then ByteLevel without its own regex); the
label -> model list is llama.cpp's (src/llama-vocab.cpp). Labels we do not know keep what
transformers built, with a warning; a label whose tokenizer cannot be rebuilt from a GGUF at all
is refused.

The file's BOS and EOS, and whether encoding adds them, are set from the file as well
(`FileSpecialTokens`): transformers 5.17's conversion of Llama-architecture files names the BOS
as the EOS too and leaves out the BOS that add_bos_token asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

from shardserve.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OriginalTokenizer:
    """The parts of an original tokenizer.json that the GGUF does not carry."""

    pre_tokenizer: Any
    normalizer: Any = None  # None: the original has none (or an empty Sequence)
    ignore_merges: bool = False  # the BPE model's flag: a piece that is a token is kept whole

    def apply_to(self, tokenizer: Any) -> None:
        """Replace these parts of a transformers tokenizer's backend (a `tokenizers.Tokenizer`).
        The decoder too: every original here decodes with ByteLevel alone. Older transformers
        (5.17) give a Llama-architecture GGUF sentencepiece's decoder chain ending in ByteLevel;
        the text comes out the same, but the detokenizer's one-decode shortcut for finished
        lazy requests (engine/detokenizer.py) recognises only a plain ByteLevel decoder."""
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = self.pre_tokenizer
        backend.normalizer = self.normalizer
        backend.decoder = decoders.ByteLevel()
        backend.model.ignore_merges = self.ignore_merges


@dataclass(frozen=True, slots=True)
class FileSpecialTokens:
    """A GGUF's own BOS/EOS ids, and which of them its encode adds."""

    ids: dict[str, int]  # "bos_token" / "eos_token" -> id
    added: tuple[str, ...]  # of those, the ones add_bos_token / add_eos_token ask for

    @classmethod
    def of(cls, gguf_file: Any) -> "FileSpecialTokens":
        vocab_size = len(gguf_file.get("tokenizer.ggml.tokens") or ())
        ids = {f"{name}_token": int(token_id) for name in ("bos", "eos")
               if (token_id := gguf_file.get(f"tokenizer.ggml.{name}_token_id")) is not None
               and 0 <= int(token_id) < vocab_size}
        added = tuple(attribute for attribute in ids
                      if gguf_file.get(f"tokenizer.ggml.add_{attribute[:3]}_token") is True)
        return cls(ids, added)

    def apply_to(self, tokenizer: Any) -> None:
        """Set them on a transformers tokenizer where its conversion disagrees; later
        transformers already agree with the file, and then nothing changes."""
        for attribute, token_id in self.ids.items():
            if getattr(tokenizer, f"{attribute}_id", None) != token_id:
                setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
        first = [self.ids["bos_token"]] if "bos_token" in self.added else []
        last = [self.ids["eos_token"]] if "eos_token" in self.added else []
        if not (first or last) or tokenizer.encode("a") == [
                *first, *tokenizer.encode("a", add_special_tokens=False), *last]:
            return
        names = {token_id: tokenizer.convert_ids_to_tokens(token_id) for token_id in (*first, *last)}

        def around(sequence: str, type_id: int) -> list[str]:
            return [*(f"{names[i]}:{type_id}" for i in first), f"${sequence}:{type_id}",
                    *(f"{names[i]}:{type_id}" for i in last)]

        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(around("A", 0)), pair=" ".join(around("A", 0) + around("B", 1)),
            special_tokens=[(name, token_id) for token_id, name in names.items()])


def _split(pattern: str) -> Any:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _then_bytes(*stages: Any) -> Any:
    # The splits cut the text; ByteLevel only maps the bytes (use_regex=False), as in every
    # original below except GPT-2-style ones.
    return pre_tokenizers.Sequence(
        [*stages, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    """A regex character class from (first, last) code points, each written as \\x{...}."""
    return "".join(f"\\x{{{first:X}}}" if first == last else f"\\x{{{first:X}}}-\\x{{{last:X}}}"
                   for first, last in ranges)


_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"

# Llama 3 (and 3.1-3.3): numbers in runs of up to three digits.
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 1.5 / 2 / 2.5 / 3 and the DeepSeek-R1 distills of Qwen: one digit a piece.
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 3.5: combining marks stay with their letters.
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# deepseek-llm (7B/67B, DeepSeek-V2, V2-Lite, V2.5, Coder-V2): the original spells its letters
# as an explicit class, the cased letters (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee,
# Glagolitic, Coptic, Deseret, Osage, Old Hungarian, Warang Citi, Adlam, fullwidth Latin...).
# Several Greek and letterlike code points here (U+1FBE, U+1FD3, U+1FDB, U+1F7D, U+2126,
# U+212A) have canonical twins elsewhere, so they are kept as numbers, not as characters an
# editor might normalize.
_DEEPSEEK_LLM_LETTERS = _char_class((
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377),
    (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C),
    (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
    (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128),
    (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE),
    (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787),
    (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A),
    (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943)))
# ASCII punctuation and symbols, their fullwidth forms, curly quotes, ideographic space and
# punctuation (U+3000-U+3002).
_DEEPSEEK_LLM_PUNCTUATION = "!-/:-~" + _char_class(
    ((0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F), (0x3000, 0x3002)))
# CJK ideographs, everything from Samaritan up to them (U+0800-U+4E00), and Hangul syllables.
_DEEPSEEK_LLM_CJK = _char_class(((0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)))

# DeepSeek-V3 / R1 / V3.1 / V3.2: digits in threes, then CJK ideographs and kana, then the rest.
_DEEPSEEK_V3_CJK = _char_class(((0x4E00, 0x9FA5), (0x3040, 0x309F), (0x30A0, 0x30FF)))
_DEEPSEEK_V3_REST = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                     r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3() -> OriginalTokenizer:
    return OriginalTokenizer(_then_bytes(_split(_LLAMA3)), ignore_merges=True)


def _qwen(pattern: str) -> Callable[[], OriginalTokenizer]:
    return lambda: OriginalTokenizer(_then_bytes(_split(pattern)), normalizers.NFC())


def _deepseek_llm() -> OriginalTokenizer:
    return OriginalTokenizer(_then_bytes(
        _split("[\r\n]"), _split(rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+"),
        _split(rf"\s?[{_DEEPSEEK_LLM_PUNCTUATION}]+"), _split(r"\s+$"),
        _split(f"[{_DEEPSEEK_LLM_CJK}]+"), pre_tokenizers.Digits(individual_digits=True)))


def _deepseek_coder() -> OriginalTokenizer:
    return OriginalTokenizer(_then_bytes(
        _split("[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
        _split(f"[{_DEEPSEEK_LLM_CJK}]+"), pre_tokenizers.Digits(individual_digits=True)))


def _deepseek_v3() -> OriginalTokenizer:
    return OriginalTokenizer(_then_bytes(
        _split(r"\p{N}{1,3}"), _split(f"[{_DEEPSEEK_V3_CJK}]+"), _split(_DEEPSEEK_V3_REST)))


def _smollm() -> OriginalTokenizer:
    # Digits alone, then GPT-2's own regex (ByteLevel with use_regex).
    return OriginalTokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))


def _gpt2() -> OriginalTokenizer:
    return OriginalTokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))


# tokenizer.ggml.pre -> the original's components, for the labels the Llama, Qwen and DeepSeek
# families' converted files carry.
ORIGINAL_TOKENIZERS: dict[str, Callable[[], OriginalTokenizer]] = {
    "llama-bpe": _llama3, "llama3": _llama3, "llama-v3": _llama3,  # Llama 3.x; older spellings
    "smollm": _smollm,
    "gpt-2": _gpt2,
    "qwen2": _qwen(_QWEN2),
    "deepseek-r1-qwen": _qwen(_QWEN2),
    "qwen35": _qwen(_QWEN35),
    "deepseek-llm": _deepseek_llm,
    "deepseek-coder": _deepseek_coder,  # deepseek-coder 1.3B-33B (llama architecture)
    "deepseek-v3": _deepseek_v3,
}

# Labels whose tokenizer a GGUF cannot describe to transformers: what to do instead.
UNSUPPORTED = {
    "kimi-k2": "Kimi-K2's tokenizer is a tiktoken model the GGUF stores without BPE merges",
}


def original_tokenizer(model: str | None, pre: str | None, path: Path) -> OriginalTokenizer | None:
    """The original's components for a GGUF's `tokenizer.ggml.model` and `tokenizer.ggml.pre`,
    or None to keep what transformers builds: a sentencepiece vocabulary (llama.cpp ignores the
    label there too) or a label we do not know (with a warning). ModelLoadError for a label
    whose tokenizer cannot be rebuilt from the file."""
    if model != "gpt2":  # only byte-level BPE vocabularies have a pre-tokenizer to choose
        return None
    if pre in UNSUPPORTED:
        raise ModelLoadError(
            f"{path} has tokenizer.ggml.pre {pre!r}: {UNSUPPORTED[pre]}, so its tokenizer cannot "
            "be rebuilt from the file. Pass the original model's tokenizer with --tokenizer (a "
            "folder with tokenizer.json).")
    build = ORIGINAL_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if build is None:
        # llama.cpp falls back too ("GENERATION QUALITY WILL BE DEGRADED" for a missing label).
        what = "no tokenizer.ggml.pre" if pre is None else f"tokenizer.ggml.pre {pre!r}"
        logger.warning(
            "%s has %s, a pre-tokenizer shardserve does not know: text is split the way "
            "transformers' GGUF conversion chose (GPT-2's rule unless it knows the name), so "
            "prompts may encode differently from the original tokenizer. Pass the original "
            "tokenizer with --tokenizer to be sure.", path, what)
        return None
    return build()
