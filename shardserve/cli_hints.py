"""Command lines copied from `vllm serve`, and flags shardserve does not know.

vLLM's flags that mean nothing here are real (hidden) options, so each takes its own values,
and are judged after parsing: accepted silently where they ask for what shardserve does,
ignored with a warning where they only tune something it lacks, refused saying why where
results would change. For any other unknown flag, suggest the nearest one the command has (a
typo is the usual cause)."""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from shardserve.errors import InvalidRequestError

_NO_TOOLS = ("tool calling is not supported (chat requests with tools are refused unless "
             "tool_choice is \"none\")")
_NO_REASONING = "reasoning is not parsed out of replies: it stays in the content"
_ONE_DP_NODE = ("serve -dp N runs its replicas on this node; across nodes run one `shardserve "
                "serve` per node and `shardserve router` in front of them")
_NO_REQUEST_LOG = "shardserve does not log requests"
# `vllm serve` flags that are not engine arguments (those are vllm_only.VLLM_ONLY_KWARGS, which
# the commands taking engine flags accept too), in the same form: the values that ask for what
# shardserve does anyway (accepted silently), whether any other value only tunes something
# shardserve lacks (ignored with a warning) or would change what the user gets (refused), why.
VLLM_ONLY_SERVER_FLAGS: dict[str, tuple[tuple[Any, ...], bool, str]] = {
    "response_role": (("assistant",), False, "chat replies always have the role 'assistant'"),
    "enable_log_requests": ((False,), True, _NO_REQUEST_LOG),
    "enable_log_outputs": ((False,), True, _NO_REQUEST_LOG),
    "max_log_len": ((None,), True, _NO_REQUEST_LOG),
    "disable_uvicorn_access_log": ((True, False), True, "uvicorn's access log is always off"),
    "disable_fastapi_docs": ((True, False), True, "the server has no /docs pages"),
    "disable_frontend_multiprocessing": ((False,), True,
                                         "the engine always runs in its own process"),
    "enable_request_id_headers": ((False,), True, "responses carry no X-Request-Id header"),
    "api_server_count": ((1,), True, "one API server process serves every request"),
    "root_path": ((None, "", "/"), True, "routes are served at /; a proxy in front must strip "
                                          "its prefix"),
    "ssl_keyfile": ((None,), False, "the server speaks plain HTTP: terminate TLS in front of it "
                                    "(an ingress or proxy)"),
    "ssl_certfile": ((None,), False, "the server speaks plain HTTP: terminate TLS in front of "
                                     "it (an ingress or proxy)"),
    "ssl_ca_certs": ((None,), False, "the server speaks plain HTTP: terminate TLS in front of "
                                     "it (an ingress or proxy)"),
    "middleware": ((None, []), False, "custom ASGI middleware is not supported"),
    "enable_auto_tool_choice": ((False,), False, _NO_TOOLS),
    "tool_call_parser": ((None,), False, _NO_TOOLS),
    "tool_parser_plugin": ((None, ""), False, _NO_TOOLS),
    "reasoning_parser": ((None, ""), False, _NO_REASONING),
    "enable_reasoning": ((False,), False, _NO_REASONING),
    "chat_template_content_format": (("auto", "string", "openai"), False,
                                     "message content is rendered as a string"),
    "return_tokens_as_token_ids": ((False,), False, "logprobs tokens are always the text"),
    "lora_modules": ((None, []), False, "LoRA adapters are not supported (merge the adapter into "
                                        "the weights)"),
    "data_parallel_size_local": ((None,), False, _ONE_DP_NODE),
    "data_parallel_address": ((None,), False, _ONE_DP_NODE),
    "data_parallel_rpc_port": ((None,), False, _ONE_DP_NODE),
    "data_parallel_start_rank": ((None, 0), False, _ONE_DP_NODE),
    "data_parallel_backend": (("mp",), False, _ONE_DP_NODE),
}
# vLLM's short forms of some of those flags.
_SHORT_FLAGS = {"compilation_config": ["-O"], "api_server_count": ["-asc"]}
# Flags vLLM takes several values for (`--cuda-graph-sizes 1 2 4`).
_LIST_FLAGS = {"cuda_graph_sizes", "lora_modules", "middleware"}
_DEST_PREFIX = "vllm_only__"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _loose_value(text: str) -> Any:
    """A vLLM-only flag's value as vLLM would read it: a number, a JSON object or list, or
    else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_vllm_only_args(parser: argparse.ArgumentParser, server: bool) -> None:
    """Take vLLM's flags that mean nothing here as real (hidden) options, so that each
    consumes its own values and check_vllm_only_args can judge them: engine ones always, the
    server's too where server is set."""
    from shardserve.vllm_only import VLLM_ONLY_KWARGS

    table = {**VLLM_ONLY_KWARGS, **(VLLM_ONLY_SERVER_FLAGS if server else {})}
    for name, (neutral, _ignorable, _why) in table.items():
        names = [_flag(name)] + _SHORT_FLAGS.get(name, [])
        dest = _DEST_PREFIX + name
        if any(isinstance(v, bool) for v in neutral):  # a switch, as in vLLM: takes no value
            parser.add_argument(*names, dest=dest, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            parser.add_argument("--no-" + name.replace("_", "-"), dest=dest,
                                action="store_const", const=False, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=dest, type=_loose_value, default=argparse.SUPPRESS,
                                nargs="+" if name in _LIST_FLAGS else None,
                                help=argparse.SUPPRESS)


def check_vllm_only_args(args: argparse.Namespace) -> list[str]:
    """Judge the vLLM-only flags given (vllm_only.vllm_only_verdict) and take them out of args.
    Returns the warnings for the ignored ones; raises InvalidRequestError (naming the flag,
    why, and what to do) for the first one that cannot be honoured."""
    from shardserve.vllm_only import VLLM_ONLY_KWARGS, vllm_only_verdict

    table = {**VLLM_ONLY_KWARGS, **VLLM_ONLY_SERVER_FLAGS}
    warnings = []
    for dest in [d for d in vars(args) if d.startswith(_DEST_PREFIX)]:
        value = getattr(args, dest)
        delattr(args, dest)
        name = dest[len(_DEST_PREFIX):]
        if name == "compilation_config" and isinstance(value, (dict, str)):
            from shardserve.vllm_only import compilation_config_settings
            settings, ignored = compilation_config_settings(value)
            for key, setting in settings.items():
                setattr(args, key, setting)
            if ignored:
                warnings.append(f"Ignoring -O/--compilation-config's {', '.join(ignored)}: "
                                f"{table[name][2]}.")
            continue
        neutral, ignorable, why = table[name]
        verdict = vllm_only_verdict(value, neutral, ignorable)
        shown = _flag(name) if isinstance(value, bool) else f"{_flag(name)} {_show(value)}"
        if verdict == "refuse":
            raise InvalidRequestError(f"{shown} is a vLLM flag shardserve cannot honour: {why}; "
                                      f"drop it.", name)
        if verdict == "warn":
            warnings.append(f"Ignoring the vLLM flag {shown}: {why}.")
    return warnings


def _show(value: Any) -> str:
    if isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value):
        return " ".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def unknown_args_message(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """One line per unrecognized flag: why it is not there, or the flag that was meant."""
    known = [s for a in parser._actions for s in a.option_strings]
    lines, rest, after_flag = [], [], False
    for arg in extra:
        if not arg.startswith("-") or arg == "-":
            if not after_flag:  # else the value of the unknown flag before it
                rest.append(arg)
            after_flag = False
            continue
        flag = arg.split("=", 1)[0]
        after_flag = "=" not in arg
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        lines.append(f"unrecognized argument {flag}"
                     + (f"; did you mean {close[0]}?" if close else
                        f" (see {parser.prog} --help)."))
    if rest:
        lines.append(f"unrecognized arguments: {' '.join(rest)}")
    return "\n  ".join(lines)
