"""Argument types and checks shared by the bench commands: bad values fail at once, before a
model loads or a server takes any load, not as a traceback (or a lost result) at the end."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardserve.errors import InvalidRequestError


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def check_output_paths(**paths: str | None) -> None:
    """Each output file's folder must exist: the results come only after the whole run."""
    for flag, path in paths.items():
        if path and not Path(path).expanduser().parent.is_dir():
            raise InvalidRequestError(f"--{flag.replace('_', '-')} {path}: its folder "
                                      f"{Path(path).expanduser().parent} does not exist.", flag)
