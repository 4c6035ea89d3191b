"""What to tell a user whose command line has flags shardserve does not know.

Many come from `vllm serve` command lines: for those, say what shardserve does instead; for
anything else, suggest the nearest flag the command has (a typo is the usual cause)."""

from __future__ import annotations

import argparse
import difflib

_NO_HUB = ("shardserve reads local files only (no model hub): download that revision first "
           "and pass its folder as the model")
# vLLM flags that shardserve does not take, and why (or what to use instead).
VLLM_ONLY_FLAGS = {
    "--swap-space": "shardserve preempts by recomputing and never swaps KV blocks to CPU memory; "
                    "drop it",
    "--cpu-offload-gb": "shardserve does not offload weights to CPU memory; use more GPUs "
                        "(-tp / -pp) instead",
    "--revision": _NO_HUB,
    "--tokenizer-revision": _NO_HUB,
    "--code-revision": _NO_HUB,
    "--download-dir": _NO_HUB,
    "--distributed-executor-backend": "shardserve always runs one worker process per GPU "
                                      "(vLLM's 'mp'); drop it",
    "--disable-log-requests": "shardserve does not log requests; drop it",
    "--enable-log-requests": "shardserve does not log requests; drop it",
    "--disable-log-stats": "shardserve logs no periodic stats (read /metrics); drop it",
    "--response-role": "chat replies always have the role 'assistant'; drop it",
    "--enable-lora": "LoRA adapters are not supported",
    "--speculative-config": "speculative decoding is not supported",
    "--tokenizer-mode": "shardserve always uses the fast tokenizer (tokenizer.json or the "
                        "GGUF's); drop it",
}


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
        if flag in VLLM_ONLY_FLAGS:
            lines.append(f"{flag} is a vLLM flag shardserve does not take: "
                         f"{VLLM_ONLY_FLAGS[flag]}.")
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        lines.append(f"unrecognized argument {flag}"
                     + (f"; did you mean {close[0]}?" if close else
                        f" (see {parser.prog} --help)."))
    if rest:
        lines.append(f"unrecognized arguments: {' '.join(rest)}")
    return "\n  ".join(lines)
