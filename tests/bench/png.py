"""PNG checks without an image library: the signature, then the IHDR chunk's width and height."""

from __future__ import annotations

import struct
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of a valid PNG; AssertionError for anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: the first chunk is not IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND", f"{path} is cut short"
    return width, height
