"""A GGUF file's metadata and tensor table, read in ~0.1 s; the tensors memory-mapped, unread.

gguf-py's GGUFReader makes a numpy view of the mapped file for every element of every metadata
array, so a vocabulary of 49,152 tokens and 48,900 merges takes it ~4.5 s, most of the default
model's start-up. This reads the same layout (GGUF v2/v3, little-endian, as llama.cpp's
gguf_init_from_file does) with struct from one mapped buffer: scalars and strings as Python values,
string arrays as lists of str, numeric arrays as lists of numbers (what GGUFReader's
`field.contents()` returns, and tests/model/test_gguf_file.py checks that it is the same). gguf-py
stays the reference for the layout's constants and for dequantizing the tensors.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

_SCALARS = {  # value type -> (struct format, numpy dtype) of one little-endian element
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous dim) first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, row_bytes], a read-only view of the mapped file; rows = prod(shape[1:])


class GGUFFile:
    """fields: key -> value; tensors: in file order. Raises ValueError for what is not a GGUF file."""

    def __init__(self, path: str) -> None:
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf, self._offset = memoryview(self._map), 0
        try:
            self._read(path)
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            if isinstance(error, ValueError) and str(error).startswith(path):
                raise
            raise ValueError(f"{path}: a truncated or corrupt GGUF file ({error}); download it again") from None

    def _read(self, path: str) -> None:
        magic, version = self._unpack("<II")
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {magic:#x}, expected {GGUF_MAGIC:#x})")
        if version not in (2, 3):
            hint = " (a big-endian file: convert it on a little-endian machine)" if version >= 1 << 16 else ""
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3){hint}")
        tensor_count, kv_count = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            (value_type,) = self._unpack("<I")
            self.fields[key] = self._value(GGUFValueType(value_type))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            shape = self._unpack(f"<{n_dims}Q")
            tensor_type, offset = self._unpack("<IQ")
            infos.append((name, shape, GGMLQuantizationType(tensor_type), offset))
        alignment = int(self.fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(name, shape, kind, data_start + offset) for name, shape, kind, offset in infos]

    def _tensor(self, name: str, shape: tuple[int, ...], kind: GGMLQuantizationType, start: int) -> GGUFTensor:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        rows = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = shape[0] // block * block_bytes
        data = self._map[start : start + rows * row_bytes].reshape(rows, row_bytes)
        return GGUFTensor(name=name, shape=tuple(int(n) for n in shape), tensor_type=kind, data=data)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        start, self._offset = self._offset, self._offset + length
        return str(self._buf[start : self._offset], "utf-8")

    def _value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type in _SCALARS:
            return self._unpack(_SCALARS[value_type][0])[0]
        if value_type != GGUFValueType.ARRAY:
            raise ValueError(f"GGUF value type {value_type} is not supported")
        item_type, count = self._unpack("<IQ")
        item_type = GGUFValueType(item_type)
        if item_type in _SCALARS:  # one numpy read, then Python numbers
            dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._offset)
            self._offset += values.nbytes
            return values.tolist()
        return [self._value(item_type) for _ in range(count)]  # strings (or arrays of arrays)
