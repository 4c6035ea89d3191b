"""Read a GGUF file's header: its metadata and where each tensor's bytes lie.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata value, and a
tokenizer's vocabulary and merges are ~100k strings, so opening SmolLM2-135M takes ~4.5 s and a
Llama-3 GGUF (128k tokens, 280k merges) far longer, in every process that opens it. This reader
walks the header once with `struct` (~0.1 s) and maps tensor data lazily; the `gguf` package
still supplies the type constants and the dequantizers. tests/loader/test_gguf.py checks it
against GGUFReader.

File layout (GGUF v2/v3, little-endian):

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count × (key: str | value_type u32 | value)        str = u64 length + UTF-8 bytes
    tensor_count × (name: str | n_dims u32 | dims u64 × n_dims | ggml_type u32 | offset u64)
    padding to general.alignment (default 32)
    tensor data; each tensor at data_start + offset
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from shardserve.errors import ModelLoadError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_KNOWN_TYPES = frozenset(int(t) for t in GGML_QUANT_SIZES)
_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's place in the file. `shape` is in numpy/PyTorch order (GGUF lists dims
    innermost first, so this is GGUF's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int  # a GGMLQuantizationType value; kept as int so unknown types still parse
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown ggml type {self.ggml_type}"

    @property
    def num_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return int(np.prod(self.shape, dtype=np.int64)) // block_size * type_size


class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"Cannot open GGUF file {self.path}: {err}") from err
        try:
            self.metadata, self.tensors, self.version = _parse(self._map)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as err:
            raise ModelLoadError(
                f"{self.path} is not a readable GGUF file ({err}); check that the download is "
                "complete, or re-export it with llama.cpp's convert_hf_to_gguf.py.") from err
        num_parts = int(self.metadata.get("split.count", 1))
        if num_parts > 1:
            # Each part holds only some tensors (and only the first the metadata); loading one
            # would fail later on missing weights, far from the cause.
            part = int(self.metadata.get("split.no", 0)) + 1
            raise ModelLoadError(
                f"{self.path} is part {part} of a GGUF split into {num_parts} files; shardserve "
                "loads single-file GGUFs. Merge the parts with llama.cpp's `llama-gguf-split "
                "--merge <first part> merged.gguf` and pass the merged file.")

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes, read-only and without a copy, shaped as `gguf.quants.dequantize`
        expects: the leading dims of `info.shape`, then the bytes of one row."""
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        rows = info.shape[:-1] if len(info.shape) > 1 else ()
        return data.reshape(*rows, -1)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        start = self.pos
        self.pos += length
        return self.buf[start:self.pos].decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            item_type = self.unpack("I")
            count = self.unpack("Q")
            fmt = _SCALAR_FORMATS.get(item_type)
            if fmt is not None:
                # Numeric arrays (token types, scores) become one numpy array, read in one go.
                dtype = np.dtype("<" + fmt)
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += dtype.itemsize * count
                return array
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {value_type} at byte {self.pos}")
        return self.unpack(fmt)


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo], int]:
    cur = _Cursor(buf)
    if buf[:4] != _MAGIC:
        raise ValueError("the file does not start with the GGUF magic bytes")
    cur.pos = 4
    version = cur.unpack("I")
    if version & 0xFFFF == 0:
        raise ValueError("the file is big-endian; only little-endian GGUF files are supported")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    num_tensors = cur.unpack("Q")
    num_kv = cur.unpack("Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I"))
    headers = []
    for _ in range(num_tensors):
        name = cur.string()
        num_dims = cur.unpack("I")
        dims = [cur.unpack("Q") for _ in range(num_dims)]
        ggml_type = cur.unpack("I")
        headers.append((name, tuple(reversed(dims)), ggml_type, cur.unpack("Q")))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, ggml_type, offset in headers:
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice")
        info = GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
        # A cut-off download parses fine up to here; catch it now, naming the file, rather than
        # as a reshape error deep inside the tokenizer or weight loading.
        if ggml_type in _KNOWN_TYPES and info.offset + info.num_bytes > len(buf):
            raise ValueError(f"tensor {name!r} ends at byte {info.offset + info.num_bytes} but the "
                             f"file has only {len(buf)} bytes: it is truncated")
        tensors[name] = info
    return metadata, tensors, version
