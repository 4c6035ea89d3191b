"""The model's tokenizer, prompt encoding and chat templating, the way vLLM does them.

- Plain prompts are encoded with the tokenizer's special tokens (BOS where the model wants it:
  Llama adds `<|begin_of_text|>`, SmolLM2 and Qwen add nothing), as vLLM's completions do.
- Chat messages are rendered to text with the model's template and encoded *without* special
  tokens, because the template writes BOS itself where the model needs one.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardserve.errors import InvalidRequestError, ModelLoadError, ShardserveError
from shardserve.loader.source import ModelSource

# Files whose presence marks a folder as a Hugging Face tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: ModelSource, tokenizer_path: str | os.PathLike[str] | None = None,
                   chat_template: str | None = None) -> Any:
    """A transformers tokenizer for the model, with its chat template set when it has one.

    `tokenizer_path` (the --tokenizer flag) overrides the model's own: a Hugging Face tokenizer
    folder or a .gguf file. Loading from a GGUF rebuilds the BPE from the file's vocabulary and
    merges (~5 s for SmolLM2's 49k tokens). `chat_template` (--chat-template: a Jinja file or
    the text) replaces the model's template for every chat: server, LLM.chat and the CLI."""
    from transformers import AutoTokenizer

    kind, path = _tokenizer_location(source, tokenizer_path)
    if kind == "gguf":
        from shardserve.loader.gguf_file import first_split_part
        path = first_split_part(path)  # of a split model, only the first part has a tokenizer
        plan = _gguf_tokenizer_plan(path)
    else:
        _check_folder_has_tokenizer(path)
        plan = _TokenizerPlan(AutoTokenizer)
    tokenizer_class, original = plan.tokenizer_class, plan.original
    try:
        if kind == "gguf":
            tokenizer = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = tokenizer_class.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        import transformers
        raise ModelLoadError(
            f"Cannot load a tokenizer from {path} with transformers {transformers.__version__}: "
            f"{str(err).rstrip('.')}. Pass a folder with tokenizer.json (or a .gguf file) via "
            "--tokenizer, or try a newer transformers.") from err
    if original is not None:
        # transformers' GGUF conversion keeps GPT-2's splitting rule for labels it does not
        # know, DeepSeek's among them: split as the model's original tokenizer does.
        original.apply_to(tokenizer)
    if plan.special_tokens is not None:
        plan.special_tokens.apply_to(tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        template = plan.chat_template if kind == "gguf" else _folder_chat_template(path)
        if template:
            tokenizer.chat_template = template
    return tokenizer


# vLLM's rule for --chat-template: a value holding any of these is the template's text itself,
# anything else names a file.
_JINJA_CHARS = "{}\n"


def resolve_chat_template(value: str) -> str:
    """The Jinja text of --chat-template: the value itself when it looks like a template (has
    braces or a line break, vLLM's rule), else the contents of the file it names."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError("chat_template must be a Jinja file's path or the template's "
                                  "text.", "chat_template")
    if any(c in value for c in _JINJA_CHARS):
        return value
    file = Path(value).expanduser()
    if not file.is_file():
        raise InvalidRequestError(f"chat_template {value!r} is not a file (and holds no Jinja "
                                  "braces, so it is not a template either): pass a .jinja file's "
                                  "path or the template's text.", "chat_template")
    try:
        return file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidRequestError(f"Cannot read chat_template file {file}: {err}",
                                  "chat_template") from err


def encode_prompt(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a plain-text prompt, with BOS added if (and only if) the tokenizer adds one
    and add_special_tokens (vLLM's request field: false for a text that holds its own BOS)."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}.", "prompt")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def token_bytes(tokenizer: Any, token_id: int, text: str) -> bytes:
    """The bytes a token stands for (OpenAI's logprobs `bytes`), given its decoded text.

    A token holding part of a character (an emoji's first bytes) decodes to U+FFFD, whose UTF-8
    is not the token's: its own bytes come from its vocabulary entry, written in byte-level
    BPE's alphabet (GPT-2, Llama 3, Qwen, SmolLM2) or as SentencePiece's <0xNN>. Joined over
    an answer's tokens they are the answer's UTF-8, which is what clients rebuild text from."""
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        byte_of = _byte_of_char()
        if piece and all(ch in byte_of for ch in piece):
            return bytes(byte_of[ch] for ch in piece)
    return text.encode()


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (transformers' table of a character for each byte), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {ch: b for b, ch in bytes_to_unicode().items()}


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = True,
                        template_kwargs: Mapping[str, Any] | None = None,
                        add_special_tokens: bool = False, **options: Any) -> list[int]:
    """Token ids of a chat rendered with the model's template (render_chat_template's text;
    options are its keyword-only ones)."""
    text = render_chat_template(tokenizer, messages, add_generation_prompt, template_kwargs,
                                **options)
    return chat_prompt_ids(tokenizer, text, add_special_tokens)


def chat_prompt_ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """The ids of a rendered chat: the template wrote any BOS itself, so none is added unless
    asked for (vLLM's add_special_tokens, off for chats)."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                         add_generation_prompt: bool = True,
                         template_kwargs: Mapping[str, Any] | None = None, *,
                         chat_template: str | None = None,
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         continue_final_message: bool = False) -> str:
    """The prompt text of a chat rendered with the model's template, or with `chat_template`
    (a Jinja string) in its place; `tools` (function schemas) are the template's `tools`.

    `template_kwargs` (vLLM's chat_template_kwargs) are extra variables for the template, e.g.
    Qwen3's enable_thinking; they may override add_generation_prompt, as in vLLM.
    `continue_final_message` (vLLM's) leaves the last message open, to be continued; it needs
    add_generation_prompt=False.

    Every caller (the server's chat and /tokenize, LLM.chat, the CLI) comes through here, so
    the rules and the errors are the same for all: InvalidRequestError when the model has no
    chat template, the options conflict, the messages are malformed, or the template fails on
    them (a Jinja error such as roles that do not alternate, or plain Python inside it)."""
    import jinja2

    if continue_final_message and add_generation_prompt:
        # vLLM's rule: one continues the last message, the other opens a new one.
        raise InvalidRequestError("continue_final_message needs add_generation_prompt=false: "
                                  "the first continues the last message, the second starts a "
                                  "new one.", "continue_final_message")
    if continue_final_message:
        template_kwargs = {"continue_final_message": True, **(template_kwargs or {})}
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template):
        raise InvalidRequestError("chat_template must be the template's Jinja text (a non-empty "
                                  "string).", "chat_template")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model has no chat template, so it cannot take chat messages; send a plain "
            "prompt to /v1/completions instead, or pass a tokenizer with a chat template "
            "(--tokenizer).", "messages")
    if tools is not None and (isinstance(tools, (str, bytes, Mapping))
                              or not isinstance(tools, Sequence)
                              or not all(isinstance(t, Mapping) for t in tools)):
        raise InvalidRequestError("tools must be a list of tool (function schema) objects.",
                                  "tools")
    conversation = _validate_messages(messages)
    options = {"add_generation_prompt": add_generation_prompt,
               **_template_variables(tokenizer, template_kwargs)}
    if chat_template is not None:
        options["chat_template"] = chat_template
    if tools:
        options["tools"] = [dict(t) for t in tools]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **options)
    except jinja2.TemplateError as err:
        raise InvalidRequestError(
            f"The model's chat template rejected the messages: {err}", "messages") from err
    except ShardserveError:
        raise
    except Exception as err:  # a TypeError on a missing key, transformers' own checks, ...
        raise InvalidRequestError(f"The chat template could not render the messages: "
                                  f"{type(err).__name__}: {err}", "messages") from err


def eos_token_ids(tokenizer: Any, hf_config: Any, folder: str | os.PathLike[str] | None) -> list[int]:
    """Every id that ends generation: the tokenizer's EOS, the model config's, and
    generation_config.json's (Llama-3-Instruct ends turns with <|eot_id|>, listed only there)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        elif int(value) not in ids:
            ids.append(int(value))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(hf_config, "eos_token_id", None))
    if folder is not None:
        generation_config = Path(folder) / "generation_config.json"
        if generation_config.is_file():
            try:
                add(json.loads(generation_config.read_text()).get("eos_token_id"))
            except (ValueError, TypeError) as err:
                raise ModelLoadError(f"Cannot read {generation_config}: {err}") from err
    return ids


def _tokenizer_location(source: ModelSource,
                        tokenizer_path: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """("gguf", file) or ("hf", folder) for where the tokenizer lives."""
    if tokenizer_path is None or str(tokenizer_path) == "":
        return source.kind, source.path
    path = Path(tokenizer_path).expanduser().resolve()
    hint = "pass a Hugging Face tokenizer folder (tokenizer.json) or a .gguf file."
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise ModelLoadError(f"--tokenizer {str(tokenizer_path)!r} is a file but not a .gguf file; {hint}")
    if path.is_dir():
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            return "hf", path
        from shardserve.loader.gguf_file import one_model_gguf
        gguf = one_model_gguf(sorted(path.glob("*.gguf")))
        if gguf is not None:
            return "gguf", gguf  # the one GGUF, or the first part of one split model
        raise ModelLoadError(f"--tokenizer {str(tokenizer_path)!r} holds no tokenizer; {hint}")
    raise ModelLoadError(f"--tokenizer {str(tokenizer_path)!r} does not exist; {hint}")


_NO_TOKENIZER_HINT = ("pass the original model's tokenizer with --tokenizer (a folder with "
                      "tokenizer.json, or a .gguf file).")


def _check_folder_has_tokenizer(path: Path) -> None:
    """ModelLoadError when the model's own folder holds no tokenizer at all (weights and
    config.json only): transformers would otherwise blame a missing sentencepiece package or an
    unknown tokenizer type None. (A GGUF's is checked in _gguf_tokenizer_plan.)"""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
                             f"{_NO_TOKENIZER_HINT}")


# GGUF architectures transformers has no config for. AutoTokenizer reads a GGUF's config only to
# pick a tokenizer class and refuses these ("architecture deepseek2 is not supported yet"); their
# byte-level vocabulary gets the generic fast tokenizer either way, so we ask for it directly.
_GGUF_ARCHS_WITHOUT_TRANSFORMERS_CONFIG = ("deepseek2",)


@dataclass(frozen=True)
class _TokenizerPlan:
    """How to load a tokenizer: the transformers class, the original tokenizer's pre-tokenizer
    and normalizer to set afterwards (None: keep transformers'), and the chat template the
    file carries (a GGUF's, for tokenizers that come without one)."""

    tokenizer_class: Any
    original: Any = None
    chat_template: str | None = None
    special_tokens: Any = None  # a GGUF's own BOS/EOS (loader/gguf_tokenizer.py)


def _gguf_tokenizer_plan(path: Path) -> _TokenizerPlan:
    """The plan for a GGUF, from one read of its header (its vocabulary makes that the costly
    part); ModelLoadError when it was written without tokenizer.ggml.* metadata."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from shardserve.loader.gguf_file import GGUFFile
    from shardserve.loader.gguf_tokenizer import FileSpecialTokens, original_tokenizer
    gguf_file = GGUFFile(path)
    model = gguf_file.get("tokenizer.ggml.model")
    if model is None:
        raise ModelLoadError(f"{path} carries no tokenizer (no tokenizer.ggml.* metadata); "
                             f"{_NO_TOKENIZER_HINT}")
    template = gguf_file.get("tokenizer.chat_template")
    return _TokenizerPlan(
        PreTrainedTokenizerFast
        if gguf_file.get("general.architecture") in _GGUF_ARCHS_WITHOUT_TRANSFORMERS_CONFIG
        else AutoTokenizer,
        original_tokenizer(model, gguf_file.get("tokenizer.ggml.pre"), path),
        template if isinstance(template, str) else None, FileSpecialTokens.of(gguf_file))


def _folder_chat_template(path: Path) -> str | None:
    """The chat template from the places a model folder keeps it, for tokenizers that came
    without one."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            template = json.loads(file.read_text()).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str):
                return template
    return None


def _template_variables(tokenizer: Any, template_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's template variables, refusing the names of apply_chat_template's own
    parameters (tokenize, tools, chat_template, ...): those would change what the call returns
    or bypass the checks on tools, not just what the template sees."""
    if not template_kwargs:
        return {}
    if not isinstance(template_kwargs, Mapping):
        raise InvalidRequestError("chat_template_kwargs must be an object.", "chat_template_kwargs")
    own = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}
    reserved = sorted(own.intersection(template_kwargs)
                      - {"add_generation_prompt", "continue_final_message"})
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}; it "
                                  "holds variables for the chat template.", "chat_template_kwargs")
    return dict(template_kwargs)


# OpenAI's message roles ("function" is its deprecated form of "tool").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and flatten text content parts to one string, as text-only
    models' templates expect."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects.",
                                  "messages")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content', got "
                f"{type(message).__name__}.", "messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string.", "messages")
        if role not in CHAT_ROLES:
            # OpenAI refuses other roles; a template would render them as some other turn or
            # silently drop them.
            raise InvalidRequestError(
                f"messages[{i}].role {role!r} is not a chat role; use one of "
                f"{', '.join(CHAT_ROLES)}.", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        elif content is None:
            if not message.get("tool_calls"):
                raise InvalidRequestError(f"messages[{i}].content is missing.", "messages")
            # An assistant turn that only called tools (OpenAI sends content null): as vLLM,
            # empty text, which every template can render; templates read message['content']
            # directly, and transformers drops a None value, so the key would be missing.
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of text parts, got "
                f"{type(content).__name__}.", "messages")
        conversation.append({**message, "content": content})
    return conversation


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{index}].content has a {kind!r} part; this model takes text only, so "
                "send parts of the form {\"type\": \"text\", \"text\": ...}.", "messages")
        texts.append(part["text"])
    return "\n".join(texts)
