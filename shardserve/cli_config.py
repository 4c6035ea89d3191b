"""Forms of `vllm serve` command lines that argparse alone does not read: flag names written
with underscores (`--max_model_len 4096`, which vLLM's parser accepts), an on/off flag right
before the model path (`--enable-prefix-caching MODEL`), and `--config config.yaml`, a YAML
mapping of long flag names to values (Kubernetes ConfigMaps carry these). All are rewritten
into plain flags before parsing."""

from __future__ import annotations

import argparse
import json
from typing import Any

from shardserve.engine_args import FALSE_WORDS, TRUE_WORDS, parse_bool
from shardserve.errors import InvalidRequestError


def dash_flag_names(argv: list[str]) -> list[str]:
    """`--max_model_len` -> `--max-model-len` (a value after '=' is left as written)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def pin_optional_switches(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--enable-prefix-caching MODEL` -> `--enable-prefix-caching=true MODEL`.

    The on/off engine flags that default to on take an optional value (`--flag false`, as old
    vLLM lines write it), so argparse would take a model path after one as that value; a flag
    followed by anything but a true/false word is given its value explicitly."""
    switches = {option for action in _all_actions(parser) if action.type is parse_bool
                for option in action.option_strings}
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in switches and (i + 1 == len(out)
                                or out[i + 1].lower() not in TRUE_WORDS + FALSE_WORDS):
            out[i] = arg + "=true"
    return out


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub],
                                                               argparse.ArgumentParser):
                yield from _all_actions(action.choices[sub])


def expand_config_file(argv: list[str], command: str,
                       parser: argparse.ArgumentParser) -> tuple[list[str], str | None]:
    """Replace `--config FILE` (of `command`, whose parser is `parser`) by the flags the file
    holds, placed before the command line's own so that those win, as in vLLM. The file's
    `model` comes back separately: the command line's positional MODEL or --model wins over it
    (vLLM's rule), which a --model flag here would instead refuse as a second model."""
    start = argv.index(command) + 1
    rest = argv[start:]
    path, kept, i = None, [], 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest):
                raise InvalidRequestError("--config needs a YAML file's path.", "config")
            path, i = rest[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            kept.append(arg)
        i += 1
    if path is None:
        return argv, None
    values = _load_yaml(path)
    model = values.pop("model", None)
    flags: list[str] = []
    for key, value in values.items():
        flags += _as_flags(str(key).replace("_", "-"), value, parser)
    # A positional MODEL first stays first: after the file's flags, a list value
    # (served-model-name: [a, b]) would take it as one more item.
    lead = kept[:1] if kept and not kept[0].startswith("-") else []
    return (argv[:start] + lead + flags + kept[len(lead):],
            None if model is None else str(model))


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as exc:
        raise InvalidRequestError(f"--config {path}: cannot read it ({exc.strerror}).",
                                  "config") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # yaml's message spans lines
        raise InvalidRequestError(f"--config {path}: not valid YAML ({detail}).",
                                  "config") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidRequestError(f"--config {path}: expected a mapping of flag names to values "
                                  f"(max-model-len: 4096), got {type(values).__name__}.",
                                  "config")
    return values


def _as_flags(name: str, value: Any, parser: argparse.ArgumentParser) -> list[str]:
    flag = "--" + name
    if isinstance(value, bool):
        if value:
            return [flag]
        # false: the --no- form where the flag has one, else nothing (a switch left off)
        return ["--no-" + name] if "--no-" + name in parser._option_string_actions else []
    if value is None:
        return []
    if isinstance(value, list):
        action = parser._option_string_actions.get(flag)
        if action is not None and action.nargs in ("+", "*"):
            return [flag] + [str(v) for v in value]  # served-model-name: [a, b]
        return [f"{flag}={json.dumps(value)}"]  # a JSON list flag (allowed-origins)
    if isinstance(value, dict):
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={value}"]  # '=': a value starting with '-' is not taken for a flag
