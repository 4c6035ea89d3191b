"""A GGUF's tokenizer splits text as the model's original Hugging Face tokenizer does, for every
tokenizer.ggml.pre label of the Llama, Qwen and DeepSeek families.

Each case writes a tiny byte-level GGUF with one label and checks the tokenizer shardserve loads
from it against a `tokenizers` tokenizer built from the same vocabulary and merges plus the
pre-tokenizer definition of the original tokenizer.json (written out below as those files have
it). The vocabulary holds, as single tokens, every piece any of the rules cuts from the test
texts, so a piece cut differently shows up as different ids.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from shardserve.errors import ModelLoadError
from shardserve.loader.source import ModelSource
from shardserve.tokenizer import load_tokenizer

TEXTS = [
    "12345678 and 1,234,567.89; x=-42 y = 3.14159",
    "Hello, world! It's John's; we'll see... I'VE DONE IT",
    "你好世界，こんにちは！カタカナ 안녕하세요 Hello世界123 中文abc",
    "line one\nline two\r\n\n\n  indented\tTab   \n",
    "emoji 😀👍🏽 party 🎉! ✨✨",
    "café naïve e\u0301 ﬁ \u212a \u2126 Ｆｕｌｌ（ｗｉｄｔｈ）",
    "Ἀθῆναι Привет Ⴀ \U00010437 ƻ µ ℵ שלום مرحبا ١٢٣ ½ ²",
    "def f(x):\n    return x**2  # square\n(abc) [def] .com a.b_c @user",
    "trailing spaces   ",
    "sentencepiece's ▁ is text here: a▁b",  # byte-level BPE decodes it as itself
]


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
DIGITS = {"type": "Digits", "individual_digits": True}
LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
          "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
         "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN35 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
          "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# deepseek-llm-7b-base / DeepSeek-V2(-Lite) / DeepSeek-Coder-V2: the letter class of their
# tokenizer.json, with escapes where the characters have look-alikes.
DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943")
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK_LLM = [_split("[\r\n]"), _split(f"\\s?[{DEEPSEEK_LLM_LETTERS}]+"),
                _split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
                _split("\\s+$"), _split(DEEPSEEK_CJK), DIGITS, BYTES]
# deepseek-coder-6.7b-instruct
DEEPSEEK_CODER = [_split("[\r\n]"), _split("\\s?\\p{L}+"), _split("\\s?\\p{P}+"),
                  _split(DEEPSEEK_CJK), DIGITS, BYTES]
# DeepSeek-V3 / R1
DEEPSEEK_V3 = [_split("\\p{N}{1,3}"), _split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
               _split("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                      "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*"
                      "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
               BYTES]
GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
NFC = {"type": "NFC"}

# label: (GGUF architecture, the original's pre_tokenizer, its normalizer, its ignore_merges)
ORIGINALS = {
    "llama-bpe": ("llama", [_split(LLAMA3), BYTES], None, True),
    "llama3": ("llama", [_split(LLAMA3), BYTES], None, True),
    "smollm": ("llama", [DIGITS, GPT2], None, False),
    "gpt-2": ("llama", [GPT2], None, False),
    "qwen2": ("qwen2", [_split(QWEN2), BYTES], NFC, False),
    "deepseek-r1-qwen": ("qwen2", [_split(QWEN2), BYTES], NFC, False),
    "qwen35": ("qwen2", [_split(QWEN35), BYTES], NFC, False),
    "deepseek-llm": ("llama", DEEPSEEK_LLM, None, False),
    "deepseek-coder": ("llama", DEEPSEEK_CODER, None, False),
    "deepseek-v3": ("deepseek2", DEEPSEEK_V3, None, False),
}
# A token no merge builds: only a tokenizer that ignores merges (Llama 3's) emits it whole.
UNMERGED = "Ġzyzzyva"


def _pre_tokenizer(stages: list[dict]) -> pre_tokenizers.PreTokenizer:
    tokenizer_json = _tokenizer_json(stages, None, {}, [], False)
    return Tokenizer.from_str(json.dumps(tokenizer_json)).pre_tokenizer


def _tokenizer_json(stages: list[dict], normalizer: dict | None, vocab: dict[str, int],
                    merges: list[tuple[str, str]], ignore_merges: bool) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": normalizer, "post_processor": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": stages},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": [list(pair) for pair in merges]}}


@pytest.fixture(scope="module")
def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte, plus each piece any rule (or GPT-2's fallback) cuts from TEXTS, built by a
    chain of merges; and UNMERGED without one."""
    splitters = [_pre_tokenizer(stages) for _, stages, _, _ in ORIGINALS.values()]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges: dict[tuple[str, str], None] = {}
    for text in TEXTS:
        for variant in (text, unicodedata.normalize("NFC", text)):
            for splitter in splitters:
                for piece, _ in splitter.pre_tokenize_str(variant):
                    for end in range(1, len(piece)):
                        merges.setdefault((piece[:end], piece[end]), None)
    for left, right in merges:
        tokens.append(left + right)
    tokens.append(UNMERGED)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, list(merges)


def _write_gguf(path: Path, arch: str, model: str, pre: str | None, vocab: dict[str, int],
                merges: list[tuple[str, str]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(vocab))
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _load(path: Path):
    try:
        return load_tokenizer(ModelSource("gguf", path, path.stem))
    except ModelLoadError as err:
        if "is not supported yet" in str(err):  # transformers 5.17 reads no deepseek2 GGUF
            pytest.skip(f"this transformers cannot read the file's architecture: {err}")
        raise


@pytest.mark.parametrize("pre", list(ORIGINALS))
def test_gguf_tokenizer_splits_like_the_original(pre, vocabulary, tmp_path):
    arch, stages, normalizer, ignore_merges = ORIGINALS[pre]
    vocab, merges = vocabulary
    tokenizer = _load(_write_gguf(tmp_path / f"{pre}.gguf", arch, "gpt2", pre, vocab, merges))
    reference = Tokenizer.from_str(json.dumps(
        _tokenizer_json(stages, normalizer, vocab, merges, ignore_merges)))
    for text in [*TEXTS, "a zyzzyva"]:
        # The pieces first (a clearer failure), then the ids.
        assert (tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
                == reference.pre_tokenizer.pre_tokenize_str(text)), text
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text).ids, text
        assert tokenizer.decode(ids) == reference.decode(ids), text


def test_each_original_encodes_unlike_gpt2s_rule(vocabulary):
    # Guards the test above: GPT-2's rule, transformers' fallback, gives other ids for each
    # original on some text, so a label left on the fallback fails there.
    vocab, merges = vocabulary
    gpt2 = Tokenizer.from_str(json.dumps(_tokenizer_json([GPT2], None, vocab, merges, False)))
    for pre, (_, stages, normalizer, ignore_merges) in ORIGINALS.items():
        original = Tokenizer.from_str(json.dumps(
            _tokenizer_json(stages, normalizer, vocab, merges, ignore_merges)))
        differ = [text for text in [*TEXTS, "a zyzzyva"]
                  if original.encode(text).ids != gpt2.encode(text).ids]
        assert bool(differ) == (pre != "gpt-2"), pre
    # DeepSeek-V3 keeps digits in threes, where GPT-2 keeps the run whole.
    assert [p for p, _ in _pre_tokenizer(DEEPSEEK_V3).pre_tokenize_str("12345678")] == [
        "123", "456", "78"]


def test_unknown_label_keeps_transformers_split_and_warns(vocabulary, tmp_path, caplog):
    vocab, merges = vocabulary
    reference = Tokenizer.from_str(json.dumps(_tokenizer_json([GPT2], None, vocab, merges, False)))
    for pre in ("no-such-tokenizer", None):
        path = _write_gguf(tmp_path / f"{pre}.gguf", "llama", "gpt2", pre, vocab, merges)
        with caplog.at_level(logging.WARNING, logger="shardserve.loader.gguf_tokenizer"):
            caplog.clear()
            tokenizer = _load(path)
        assert "a pre-tokenizer shardserve does not know" in caplog.text
        assert (repr(pre) if pre else "no tokenizer.ggml.pre") in caplog.text
        assert tokenizer.encode(TEXTS[0], add_special_tokens=False) == reference.encode(
            TEXTS[0]).ids


def test_kimi_k2_label_is_refused_with_a_hint(vocabulary, tmp_path):
    vocab, merges = vocabulary
    path = _write_gguf(tmp_path / "kimi.gguf", "deepseek2", "gpt2", "kimi-k2", vocab, merges)
    with pytest.raises(ModelLoadError, match=r"'kimi-k2'.*tiktoken.*--tokenizer"):
        _load(path)
