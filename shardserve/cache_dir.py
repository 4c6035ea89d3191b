"""Where shardserve keeps what it works out once per machine: $SHARDSERVE_CACHE_DIR, else
~/.cache/shardserve (the GGUF tokenizers the tests convert, the batch-1 GEMV choices)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SHARDSERVE_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "shardserve")
