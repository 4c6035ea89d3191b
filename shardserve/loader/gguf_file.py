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

A model split by llama.cpp's gguf-split (or convert_hf_to_gguf --split-max-*) comes as
NAME-00001-of-0000N.gguf ... NAME-0000N-of-0000N.gguf: each part a GGUF of its own holding some
tensors and split.no / split.count, the first part all the other metadata. As llama.cpp does, we
take any part's path and read all of them as one model.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from shardserve.errors import ModelLoadError

_MAGIC = b"GGUF"
# llama.cpp's split naming (llama_split_path): NAME-00001-of-00003.gguf.
_SPLIT_NAME = re.compile(r"(?P<name>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)
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
    part: int = 0  # which file of a split model holds it (0: the first, or the only one)

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
    """A parsed GGUF header plus read-only memory maps of the file, or of every part of a split
    model (`path` is then the first part, whichever part was given)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata, self.tensors, self.version, part_map = _open(self.path)
        self._maps = [part_map]
        num_parts = int(self.metadata.get("split.count", 1))
        if num_parts > 1:
            self._open_other_parts(num_parts)

    def _open_other_parts(self, num_parts: int) -> None:
        given = self.path
        part_no = int(self.metadata.get("split.no", 0))
        paths = split_part_paths(given, num_parts)
        if paths is None:
            raise ModelLoadError(
                f"{given} is part {part_no + 1} of a GGUF split into {num_parts} files, but its "
                "name does not end in -0000K-of-0000N.gguf, so the other parts cannot be found. "
                "Restore the names llama.cpp's gguf-split gave the parts, or merge them with "
                "`llama-gguf-split --merge <first part> merged.gguf` and pass the merged file.")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ModelLoadError(
                f"{given} is part {part_no + 1} of a GGUF split into {num_parts} files, and "
                f"{len(missing)} of them {'is' if len(missing) == 1 else 'are'} missing: "
                f"{', '.join(missing)}. Download every part into the same folder.")
        # The first part holds the model's metadata; the others only their split.* keys.
        opened = {given: (self.metadata, self.tensors, self.version, self._maps[0])}
        self.path = paths[0]
        self._maps = []
        tensors: dict[str, GGUFTensorInfo] = {}
        for index, path in enumerate(paths):
            metadata, part_tensors, version, part_map = opened.get(path) or _open(path)
            if (int(metadata.get("split.count", 1)), int(metadata.get("split.no", 0))) \
                    != (num_parts, index):
                raise ModelLoadError(
                    f"{path} does not say it is part {index + 1} of {num_parts} (split.no, "
                    "split.count): the parts come from different splits. Download the parts "
                    "of one model again.")
            if index == 0:
                self.metadata, self.version = metadata, version
            self._maps.append(part_map)
            for name, info in part_tensors.items():
                if name in tensors:
                    raise ModelLoadError(f"Tensor {name!r} is in two parts of the split GGUF "
                                         f"{paths[0]}; download the parts again.")
                tensors[name] = GGUFTensorInfo(info.name, info.shape, info.ggml_type,
                                               info.offset, index)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(tensors):
            raise ModelLoadError(
                f"The {num_parts} parts of the split GGUF {paths[0]} hold {len(tensors)} "
                f"tensors, not the {int(expected)} the first part lists; download them again.")
        self.tensors = tensors

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes, read-only and without a copy, shaped as `gguf.quants.dequantize`
        expects: the leading dims of `info.shape`, then the bytes of one row."""
        data = np.frombuffer(self._maps[info.part], dtype=np.uint8, count=info.num_bytes,
                             offset=info.offset)
        rows = info.shape[:-1] if len(info.shape) > 1 else ()
        return data.reshape(*rows, -1)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def split_part_paths(path: Path, num_parts: int | None = None) -> list[Path] | None:
    """Every part's path of a split GGUF named as llama.cpp names them, from any part's path
    (None if the name is not of that form)."""
    match = _SPLIT_NAME.fullmatch(path.name)
    if match is None or (num_parts is not None and int(match["count"]) != num_parts):
        return None
    count = int(match["count"])
    suffix = path.name[match.end("count"):]  # .gguf, in the case the file has it
    return [path.with_name(f"{match['name']}-{i:05d}-of-{count:05d}{suffix}")
            for i in range(1, count + 1)]


def one_model_gguf(ggufs: list[Path]) -> Path | None:
    """Of a folder's .gguf files (sorted), the one to open: the only one, or the first part of
    the one model split across all of them; None when there is none or several models."""
    if len(ggufs) == 1:
        return ggufs[0]
    parts = split_part_paths(ggufs[0]) if ggufs else None
    return ggufs[0] if parts and set(ggufs) <= set(parts) else None


def first_split_part(path: Path) -> Path:
    """The part of a split GGUF that holds the metadata (tokenizer, chat template): the first;
    any other path as it is."""
    parts = split_part_paths(path)
    return parts[0] if parts is not None and parts[0].is_file() else path


def _open(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo], int, mmap.mmap]:
    try:
        with open(path, "rb") as f:
            file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot open GGUF file {path}: {err}") from err
    try:
        return (*_parse(file_map), file_map)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as err:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({err}); check that the download is "
            "complete, or re-export it with llama.cpp's convert_hf_to_gguf.py.") from err


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
