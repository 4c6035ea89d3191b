"""Iterate a Hugging Face folder's safetensors weights as lazy slices.

Files are memory-mapped (safe_open) and each tensor is yielded as a slice that reads nothing
until it is indexed, so a TP rank's weight_loader pages in only its own rows or columns.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from shardserve.errors import ModelLoadError
from shardserve.layers.weight_utils import LazySlice

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint files in load order: those the index names, else model.safetensors,
    else every *.safetensors in the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {err}") from err
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names files that are missing: {', '.join(missing)}; "
                                 "the checkpoint download is incomplete.")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors weights.")
    return files


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """safe_open, with a damaged file (truncated download, not safetensors) reported as a
    ModelLoadError naming it rather than as the library's bare header error."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"Cannot read {path}: {err}. The file is damaged or incomplete; "
                             "download the checkpoint again.") from err
    with handle as f:
        yield f


def count_safetensors_weights(folder: str | Path) -> int:
    """Number of tensors in the checkpoint (reads only the headers)."""
    total = 0
    for path in safetensors_files(folder):
        with _open(path) as f:
            total += len(f.keys())
    return total


def iter_safetensors_weights(folder: str | Path) -> Iterator[tuple[str, LazySlice]]:
    """(HF tensor name, lazy slice) for every tensor of the checkpoint. Use each slice before
    asking for the next item: its file is closed once the iteration leaves it."""
    for path in safetensors_files(folder):
        with _open(path) as f:
            for name in f.keys():
                yield name, f.get_slice(name)
