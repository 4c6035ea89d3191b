"""Tokenizer loading, prompt encoding and chat templating against transformers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from shardserve.errors import InvalidRequestError, ModelLoadError
from shardserve.loader.source import ModelSource
from shardserve.tokenizer import (apply_chat_template, encode_prompt, eos_token_ids, load_tokenizer,
                                  render_chat_template, resolve_chat_template, token_bytes)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    path = Path(smollm2_gguf)
    start = time.perf_counter()
    tokenizer = load_tokenizer(ModelSource("gguf", path, path.stem))
    print(f"GGUF tokenizer load: {time.perf_counter() - start:.1f} s")
    return tokenizer


def test_gguf_tokenizer_matches_transformers(gguf_tokenizer, smollm2_hf_reference, smollm2_gguf):
    reference = smollm2_hf_reference[1]
    expected = reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    ids = apply_chat_template(gguf_tokenizer, CHAT)
    assert ids == list(expected)
    # SmolLM2's template opens every turn with <|im_start|> (its BOS, id 1) and ends it with
    # <|im_end|> (EOS, id 2); the prompt ends ready for the assistant's reply.
    assert ids[0] == 1 and gguf_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    # SmolLM2 adds no BOS to plain prompts (tokenizer.ggml.add_bos_token is false).
    assert encode_prompt(gguf_tokenizer, "Hello world") == reference.encode("Hello world")
    assert encode_prompt(gguf_tokenizer, "Hello world")[0] != 1
    config = smollm2_hf_reference[0].config
    assert eos_token_ids(gguf_tokenizer, config, Path(smollm2_gguf).parent) == [2]


def test_bos_is_added_when_the_tokenizer_asks(tiny_model_dirs):
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    tokenizer.add_bos_token = True  # as Llama's tokenizer_config.json says
    ids = encode_prompt(tokenizer, "Hello world")
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer.encode("Hello world", add_special_tokens=False)


def test_token_bytes_join_to_the_texts_utf8(tiny_model_dirs):
    """OpenAI's logprobs bytes: a token holding part of a character decodes to U+FFFD, but its
    bytes are its own, so an answer's tokens' bytes join to the answer's UTF-8."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    text = "A cat 🐱, 日本語 and café."
    ids = encode_prompt(tokenizer, text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "\ufffd" in "".join(pieces)  # some tokens split a character (byte-level BPE)
    assert b"".join(token_bytes(tokenizer, i, p) for i, p in zip(ids, pieces)) == text.encode()

    class SentencePieceLike:  # byte-fallback pieces, as Llama 2's and Mistral's vocabularies
        def convert_ids_to_tokens(self, token_id):
            return {7: "<0xF0>", 8: "<0x9F>", 9: "\ufffd"}[token_id]

    sp = SentencePieceLike()
    assert token_bytes(sp, 7, "\ufffd") == b"\xf0" and token_bytes(sp, 8, "\ufffd") == b"\x9f"
    assert token_bytes(sp, 9, "\ufffd") == "\ufffd".encode()  # the character itself


def test_chat_template_found_in_chat_template_json(tiny_model_dirs, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = load_tokenizer(ModelSource("gguf", Path("/nonexistent.gguf"), "x"), tokenizer_path=folder)
    assert tokenizer.chat_template == template
    text = tokenizer.decode(apply_chat_template(tokenizer, CHAT, add_generation_prompt=False))
    assert text.endswith("What is the capital of France?<|im_end|>\n")


def test_chat_errors_are_invalid_requests(tiny_model_dirs, tmp_path):
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    bad_messages = [
        [],
        "hello",
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ]
    for messages in bad_messages:
        with pytest.raises(InvalidRequestError) as err:
            apply_chat_template(tokenizer, messages)
        assert err.value.param == "messages"
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    assert tokenizer.decode(apply_chat_template(tokenizer, parts)).count("capital\nof France?") == 1
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        apply_chat_template(tokenizer, CHAT)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(ModelSource("hf", tmp_path, "x"), tokenizer_path=tmp_path / "missing")


def test_only_openai_roles_are_accepted(tiny_model_dirs):
    """OpenAI's roles reach the template; any other is refused, naming the message and the
    roles to use (a template would render it as some other turn, or drop it silently)."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    for role in ("system", "developer", "user", "assistant", "tool", "function"):
        text = render_chat_template(tokenizer, [*CHAT, {"role": role, "content": "x"}])
        assert f"<|im_start|>{role}\nx<|im_end|>" in text, role
        assert apply_chat_template(tokenizer, [*CHAT, {"role": role, "content": "x"}]) == \
            tokenizer.encode(text, add_special_tokens=False)
    for role in ("wizard", "User", "model"):
        with pytest.raises(InvalidRequestError) as err:
            apply_chat_template(tokenizer, [*CHAT, {"role": role, "content": "x"}])
        assert err.value.param == "messages[1].role"
        assert repr(role) in str(err.value)
        assert "system, developer, user, assistant, tool, function" in str(err.value)


def test_a_tool_calling_turn_with_null_content_renders_as_empty_text(tiny_model_dirs):
    """A chat history from a tool-using client: the assistant's tool-call turn has content
    null (OpenAI's form). It renders as an empty turn, as in vLLM, not a template error about
    a missing 'content' (transformers drops None values); null without tool_calls is still
    refused."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_capital", "arguments": '{"country": "France"}'}}
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Paris"}]
    text = render_chat_template(tokenizer, history)
    assert "<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\nParis<|im_end|>" in text
    with pytest.raises(InvalidRequestError, match="content is missing"):
        render_chat_template(tokenizer, [*CHAT, {"role": "assistant", "content": None}])


def test_template_kwargs_are_template_variables(tiny_model_dirs):
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny"))
    tokenizer.chat_template = ("{% if enable_thinking is defined and not enable_thinking %}"
                               "no-think {% endif %}{{ messages[0]['content'] }}")
    text = tokenizer.decode(apply_chat_template(tokenizer, CHAT, template_kwargs={"enable_thinking": False}))
    assert text == "no-think What is the capital of France?"
    assert tokenizer.decode(apply_chat_template(tokenizer, CHAT)) == CHAT[0]["content"]
    # apply_chat_template's own parameters are not template variables.
    for key in ("tokenize", "chat_template", "tools", "messages"):
        with pytest.raises(InvalidRequestError, match=key) as err:
            apply_chat_template(tokenizer, CHAT, template_kwargs={key: True})
        assert err.value.param == "chat_template_kwargs"


def test_eos_ids_include_generation_config(tmp_path):
    class Tok:
        eos_token_id = 2

    class Config:
        eos_token_id = [2, 5]

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert eos_token_ids(Tok(), Config(), tmp_path) == [2, 5, 7]
    assert eos_token_ids(Tok(), None, None) == [2]


def test_chat_template_flag_is_a_file_or_the_text(tiny_model_dirs, tmp_path):
    """vLLM's --chat-template: a value with braces or a line break is the template's text,
    anything else names a file; either replaces the model's own template."""
    source = ModelSource("hf", Path(tiny_model_dirs["llama"]), "tiny")
    text = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    file = tmp_path / "mine.jinja"
    file.write_text(text)
    for value in (text, str(file)):
        tokenizer = load_tokenizer(source, chat_template=value)
        assert tokenizer.chat_template == text
        prompt = tokenizer.decode(apply_chat_template(tokenizer, CHAT, add_generation_prompt=False))
        assert prompt.endswith("<user>What is the capital of France?")
    with pytest.raises(InvalidRequestError, match="not a file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(InvalidRequestError, match="chat_template"):
        resolve_chat_template("  ")


def test_chat_template_flag_reaches_the_engine(tiny_model_dirs, tmp_path):
    """--chat-template reaches every chat path (LLM.chat here; the server and the CLI take the
    engine's tokenizer too), and a missing file is refused when the config resolves."""
    from shardserve import LLM, SamplingParams
    from shardserve.config import EngineConfig

    with pytest.raises(InvalidRequestError, match="not a file"):
        EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                 chat_template=str(tmp_path / "nope.jinja")).resolve()
    llm = LLM(tiny_model_dirs["llama"], device="cpu", max_model_len=64,
              kv_cache_memory_bytes=1 << 20, chat_template="{{ messages[0].content }}!")
    try:
        out = llm.chat([{"role": "user", "content": "hi"}],
                       SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        assert out[0].prompt == "hi!"
    finally:
        llm.shutdown()


def test_a_model_without_a_tokenizer_says_to_pass_one(tiny_model_dirs, tmp_path):
    # transformers blamed a missing sentencepiece package, or a GGUF "tokenizer None".
    folder = tmp_path / "weights_only"
    folder.mkdir()
    shutil.copy(Path(tiny_model_dirs["llama"]) / "config.json", folder)
    with pytest.raises(ModelLoadError, match=r"holds no tokenizer \(tokenizer\.json.*--tokenizer"):
        load_tokenizer(ModelSource("hf", folder, "weights_only"))
    # --tokenizer supplies one.
    assert load_tokenizer(ModelSource("hf", folder, "x"), tiny_model_dirs["llama"]).vocab_size > 0

    import gguf
    path = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"carries no tokenizer \(no tokenizer\.ggml"):
        load_tokenizer(ModelSource("gguf", path, path.stem))


def test_a_tokenizer_folder_with_neither_tokenizer_nor_gguf_is_a_clear_error(tiny_model_dirs,
                                                                             tmp_path):
    # It raised IndexError once folders of split GGUF parts were accepted.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_tokenizer(ModelSource("hf", Path(tiny_model_dirs["llama"]), "m"), empty)
