"""The on-disk chunk record: a self-describing header plus the codec's layer sections (LLMS §5.2, §7).

Owns the binary layout of a header, the checksums and their verification. A header names its model, codec, level,
token span and prefix hash, so that KV built for another model, codec or token prefix is never used, and says where
its chunk's sections lie: layer l at (header offset + sections_rel + l * layer_stride). A lone record has
layer_stride == section_bytes (header, then its sections back to back); in a group written together (chunk_log.py)
the sections of one layer of every chunk are adjacent, so one layer of the group is one contiguous byte range.
Ignores what the payload means: opaque bytes, `n_layers` sections of `section_bytes` each.

Header layout, little-endian (FORMAT_VERSION 1):
    fixed part (_FIXED below, 92 bytes) | model id utf-8 | codec id utf-8 | zero pad to 8 | n_layers x u64 section
    checksums | u64 header checksum (over every header byte before it)
Checksums are XXH3-64 (measured 4-8x faster than zlib.crc32 here, see scripts/bench_chunk_log.py); a section's
seed is derived from its layer, so a section read at another layer's position does not verify.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch
import xxhash

from llmaas.storage.segment_io import as_memoryview

MAGIC = b"LLMSKVCR"
FORMAT_VERSION = 1
PREFIX_HASH_BYTES = 16
_FIXED = struct.Struct("<8sHHIIIIIHHQQQQQ16s")
_U64 = struct.Struct("<Q")
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


class ChunkFault(StrEnum):
    """Why a stored chunk was not used. The caller recomputes it from the retained token ids."""

    MISSING = "missing"  # no committed row, or its segment file is gone
    TRUNCATED = "truncated"  # the segment ends before the record does
    BAD_HEADER = "bad_header"  # wrong magic, header checksum mismatch, or inconsistent lengths
    WRONG_FORMAT = "wrong_format_version"
    WRONG_MODEL = "wrong_model"
    WRONG_CODEC = "wrong_codec"
    MISMATCH = "header_mismatch"  # a valid header that describes another chunk than the index row
    CHECKSUM = "section_checksum"  # a layer section read does not match its checksum
    IO_ERROR = "io_error"  # the OS failed the read (EIO, ...)


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk version to write. `payload`: uint8, n_layers * section_bytes, layer-major (any shape, contiguous)."""

    chunk_index: int
    version: int
    level: int
    token_start: int
    token_end: int  # exclusive; token_end - token_start = the chunk size
    fill: int  # valid tokens from token_start (the partial last chunk has fill < token_end - token_start)
    prefix_hash: bytes  # 16 bytes: hash of every token id in [0, token_end) of the context
    n_layers: int
    section_bytes: int
    payload: torch.Tensor

    def __post_init__(self) -> None:
        if min(self.chunk_index, self.version, self.level, self.token_start) < 0:
            raise ValueError("chunk_index, version, level and token_start must be >= 0")
        if not 0 < self.fill <= self.token_end - self.token_start:
            raise ValueError(f"fill {self.fill} must be in 1..{self.token_end - self.token_start} (the token span)")
        if len(self.prefix_hash) != PREFIX_HASH_BYTES:
            raise ValueError(f"prefix_hash must be {PREFIX_HASH_BYTES} bytes, got {len(self.prefix_hash)}")
        if self.n_layers < 1 or self.section_bytes < 1:
            raise ValueError("n_layers and section_bytes must be >= 1")
        p = self.payload
        if p.dtype != torch.uint8 or p.device.type != "cpu" or not p.is_contiguous():
            raise ValueError(f"payload must be a contiguous CPU uint8 tensor, got {p.dtype} on {p.device}")
        if p.numel() != self.n_layers * self.section_bytes:
            raise ValueError(f"payload has {p.numel()} bytes; n_layers * section_bytes = "
                             f"{self.n_layers * self.section_bytes}")

    def payload_view(self) -> memoryview:
        return as_memoryview(self.payload.reshape(-1).numpy())


class RecordMeta(Protocol):
    """What a header states about its chunk: a ChunkRecord being written, or the ChunkLocation of one being moved.
    Read-only properties, so that frozen dataclasses (both of those) satisfy it."""

    @property
    def chunk_index(self) -> int: ...

    @property
    def version(self) -> int: ...

    @property
    def level(self) -> int: ...

    @property
    def token_start(self) -> int: ...

    @property
    def token_end(self) -> int: ...

    @property
    def fill(self) -> int: ...

    @property
    def prefix_hash(self) -> bytes: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def section_bytes(self) -> int: ...


@dataclass(frozen=True)
class RecordHeader:
    """A parsed header whose magic, format version and checksum were verified."""

    header_bytes: int
    level: int
    n_layers: int
    chunk_index: int
    fill: int
    section_bytes: int
    version: int
    token_start: int
    token_end: int
    sections_rel: int  # layer l's section starts sections_rel + l * layer_stride bytes after the header's start
    layer_stride: int
    prefix_hash: bytes
    model_id: str
    codec_id: str
    checksums: tuple[int, ...]  # XXH3-64 of each layer section


def _seed(layer: int) -> int:
    return ((layer + 1) * _GOLDEN) & _MASK64


_SEEDS = tuple(_seed(layer) for layer in range(256))  # verification is on the restore path: no per-section arithmetic


def checksum_section(section: memoryview, layer: int) -> int:
    return xxhash.xxh3_64_intdigest(section, _SEEDS[layer] if layer < len(_SEEDS) else _seed(layer))


def header_size(n_layers: int, model_id: str, codec_id: str) -> int:
    strings = len(model_id.encode()) + len(codec_id.encode())
    return -(-(_FIXED.size + strings) // 8) * 8 + 8 * n_layers + 8


def section_checksums(record: ChunkRecord) -> list[int]:
    payload, s = record.payload_view(), record.section_bytes
    return [checksum_section(payload[i * s:(i + 1) * s], i) for i in range(record.n_layers)]


def encode_header(record: RecordMeta, model_id: str, codec_id: str, checksums: Sequence[int], sections_rel: int,
                  layer_stride: int) -> bytes:
    """The header of `record`, whose sections lie at sections_rel + l * layer_stride from the header's start."""
    model, codec = model_id.encode(), codec_id.encode()
    if len(model) > 0xFFFF or len(codec) > 0xFFFF:
        raise ValueError("model_id and codec_id must be shorter than 64 KiB")
    size = header_size(record.n_layers, model_id, codec_id)
    head = bytearray(size)
    _FIXED.pack_into(head, 0, MAGIC, FORMAT_VERSION, record.level, size, record.n_layers, record.chunk_index,
                     record.fill, record.section_bytes, len(model), len(codec), record.version, record.token_start,
                     record.token_end, sections_rel, layer_stride, record.prefix_hash)
    head[_FIXED.size:_FIXED.size + len(model) + len(codec)] = model + codec
    sums_at = size - 8 - 8 * record.n_layers
    head[sums_at:size - 8] = array("Q", checksums).tobytes()  # native = little-endian on every platform we run on
    _U64.pack_into(head, size - 8, xxhash.xxh3_64_intdigest(memoryview(head)[:size - 8]))
    return bytes(head)


def parse_header(buf: memoryview, model_id: str, codec_id: str) -> RecordHeader | ChunkFault:
    """Verify and parse a whole header (`buf` is exactly the header's bytes, as recorded in the index)."""
    if len(buf) < _FIXED.size + 8:
        return ChunkFault.BAD_HEADER
    (magic, fmt, level, size, n_layers, chunk_index, fill, section_bytes, model_len, codec_len, version, token_start,
     token_end, sections_rel, layer_stride, prefix) = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        return ChunkFault.BAD_HEADER
    if fmt != FORMAT_VERSION:
        return ChunkFault.WRONG_FORMAT
    strings_end = _FIXED.size + model_len + codec_len
    if size != len(buf) or size != -(-strings_end // 8) * 8 + 8 * n_layers + 8:
        return ChunkFault.BAD_HEADER
    if _U64.unpack_from(buf, size - 8)[0] != xxhash.xxh3_64_intdigest(buf[:size - 8]):
        return ChunkFault.BAD_HEADER
    model = bytes(buf[_FIXED.size:_FIXED.size + model_len]).decode(errors="replace")
    codec = bytes(buf[_FIXED.size + model_len:strings_end]).decode(errors="replace")
    if model != model_id:
        return ChunkFault.WRONG_MODEL
    if codec != codec_id:
        return ChunkFault.WRONG_CODEC
    sums = tuple(buf[size - 8 - 8 * n_layers:size - 8].cast("Q"))  # native = little-endian, as written
    return RecordHeader(size, level, n_layers, chunk_index, fill, section_bytes, version, token_start, token_end,
                        sections_rel, layer_stride, prefix, model, codec, sums)


def section_seeds(first_layer: int, num_layers: int) -> np.ndarray:
    """uint64 [num_layers]: the checksum seeds of layers [first_layer, first_layer + num_layers) (checksum_section;
    verification of many sections at once: storage/native.py)."""
    return np.array([_SEEDS[j] if j < len(_SEEDS) else _seed(j) for j in range(first_layer, first_layer + num_layers)],
                    dtype=np.uint64)


def chain_prefix_hash(previous: bytes, token_ids: Sequence[int]) -> bytes:
    """A convenience for callers: h_i = BLAKE2b-128(h_{i-1} || ids of chunk i), h_{-1} = b"". Chaining per chunk
    makes h_i depend on every id in [0, end of chunk i) at the cost of hashing only the new chunk's ids."""
    return hashlib.blake2b(previous + array("i", token_ids).tobytes(), digest_size=PREFIX_HASH_BYTES).digest()
