"""--serve-arg: checked against the real `shardserve serve` parser when the objects are
written (a flag the server refuses would only show as pods in CrashLoopBackOff), and split
for LeaderWorkerSet workers, whose `shardserve worker` takes the engine flags alone."""

from __future__ import annotations

import argparse
import contextlib
import io

from shardserve.errors import InvalidRequestError

# Flags the generator sets itself, from its own options: the objects depend on their values
# (probes and Services on the port, GPU requests on the sizes, LWS variables on the nodes).
RESERVED = {
    "--model": "deploy k8s --model", "--tensor-parallel-size": "deploy k8s -tp",
    "-tp": "deploy k8s -tp", "--pipeline-parallel-size": "deploy k8s -pp",
    "-pp": "deploy k8s -pp", "--data-parallel-size": "deploy k8s -dp (one replica per pod)",
    "-dp": "deploy k8s -dp (one replica per pod)", "--nnodes": "the LeaderWorkerSet's size",
    "--node-rank": "the LeaderWorkerSet's worker index",
    "--master-addr": "the LeaderWorkerSet's leader address",
    "--master-port": "the generator (its Service ports)",
    "--headless": "the generator (LeaderWorkerSet workers run `shardserve worker`)",
    "--host": "the generator (0.0.0.0)", "--port": "the generator (probes and Services use it)",
    "--shutdown-timeout": "deploy k8s --shutdown-timeout (the grace period is built on it)",
    "--served-model-name": "deploy k8s --served-model-name",
}


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from shardserve.cli import build_parser
    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return commands["serve"], commands["worker"]


def _split(args: list[str]) -> list[tuple[str, list[str]]]:
    """[(flag, the strings that make it up)], a flag's separate values included."""
    out: list[tuple[str, list[str]]] = []
    for arg in args:
        if arg.startswith("-") and not _is_number(arg):
            out.append((arg.split("=", 1)[0], [arg]))
        elif out:
            out[-1][1].append(arg)
        else:
            raise InvalidRequestError(f"--serve-arg {arg!r} is not a flag: pass each as "
                                      "--serve-arg=--name=value.", "serve_args")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_serve_args(args: list[str]) -> None:
    """Refuse flags the generator owns, and any the server's parser would refuse."""
    serve, _ = _parsers()
    for flag, _strings in _split(args):
        action = serve._option_string_actions.get(flag)
        names = action.option_strings if action else [flag]
        owner = next((RESERVED[n] for n in names if n in RESERVED), None)
        if owner:
            raise InvalidRequestError(f"--serve-arg {flag} is set by {owner}; drop it from "
                                      "--serve-arg.", "serve_args")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            namespace, extra = serve.parse_known_args(list(args))
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["invalid"])[-1]
        raise InvalidRequestError(f"--serve-arg: `shardserve serve` would refuse it: "
                                  f"{last.split('error: ', 1)[-1]}", "serve_args") from None
    if extra:
        from shardserve.cli_hints import unknown_args_message
        raise InvalidRequestError(f"--serve-arg: `shardserve serve` would refuse it: "
                                  f"{unknown_args_message(extra, serve)}", "serve_args")
    from shardserve.cli_hints import check_vllm_only_args
    try:
        check_vllm_only_args(namespace)  # a vLLM flag it would refuse (warnings are its own)
    except InvalidRequestError as err:
        raise InvalidRequestError(f"--serve-arg: `shardserve serve` would refuse it: {err}",
                                  "serve_args") from None


def engine_only(args: list[str]) -> list[str]:
    """The flags of `args` that `shardserve worker` takes (the engine's), in order."""
    serve, worker = _parsers()
    return [s for flag, strings in _split(args)
            if flag in worker._option_string_actions for s in strings]
