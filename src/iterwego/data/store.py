"""Stored features read on demand: a feature bank's rows gathered from shard files, never the whole bank in memory.

A shard is a safetensors file holding one tensor, ``features`` (rows x ...), in a compact dtype (float16 or
bfloat16 for backbone features, uint8 for pixels). Its JSON header gives the dtype, the shape and where the
data start, so any row is one positioned read. :class:`StoredFeatures` maps a bank's rows to (shard, row in
shard) and ``features[rows]`` reads just those rows, so host memory holds one batch whatever the size of the
store. Rows the cache could not write (a read-only directory) are held in memory instead, as a fallback.

Why reads into fresh buffers rather than ``mmap``: the pages of a mapped file that a process has touched count
in its resident set until the mapping goes, so an epoch over a memory-mapped store shows the whole store in the
process's memory. Read with ``readinto``, the data pass through the kernel's page cache (shared, and dropped
under pressure) and the process keeps only the batch it asked for.

Why safetensors: a well-kept, documented format (an 8-byte header length, a JSON header, raw little-endian
data) that every framework reads, with no code execution on load, which is why the feature cache already used
it; rows of a row-major tensor are contiguous byte ranges, so reading a row needs no library at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

# safetensors dtype code -> (numpy dtype the bytes are read as, torch dtype they are)
_CODES = {
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: read the bits, view them in torch
    "F32": (np.float32, torch.float32),
    "U8": (np.uint8, torch.uint8),
}
#: the storage dtypes a config may ask for (``encoder.feature_dtype``); non-float features keep their own
STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_HEADER = 64 << 20  # a larger header means a damaged length field, not a real shard
_HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class Shard:
    """Where one shard's rows lie in its file."""

    path: str
    start: int  # byte offset of row 0
    code: str  # safetensors dtype code
    shape: tuple[int, ...]  # (rows, ...)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(_CODES[self.code][0]).itemsize

    @property
    def dtype(self) -> torch.dtype:
        return _CODES[self.code][1]


def read_shard(path: str | os.PathLike) -> tuple[Shard, dict]:
    """The shard's layout and its metadata; ``ValueError`` when the file is not a complete single-tensor shard."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= _MAX_HEADER:
            raise ValueError(f"header length {n} out of range")
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    if len(raw) != n:
        raise ValueError("header cut short")
    header = json.loads(raw)
    spec = header.get("features") if isinstance(header, dict) else None
    if not isinstance(spec, dict) or spec.get("dtype") not in _CODES:
        raise ValueError(f"no 'features' tensor of a known dtype (got {spec and spec.get('dtype')!r})")
    shape = tuple(int(x) for x in spec["shape"])
    begin, end = (int(x) for x in spec["data_offsets"])
    shard = Shard(path, 8 + n + begin, spec["dtype"], shape)
    if not shape or end - begin != shape[0] * shard.row_bytes or 8 + n + end != size:
        raise ValueError("data size does not match the header (truncated or padded file)")
    return shard, header.get("__metadata__") or {}


def shard_digest(shard: Shard) -> str:
    """sha256 of the shard's data bytes, read in chunks (memory stays flat whatever the shard's size)."""
    h = hashlib.sha256()
    left = shard.shape[0] * shard.row_bytes
    buf = bytearray(min(_HASH_CHUNK, max(left, 1)))
    view = memoryview(buf)
    with open(shard.path, "rb", buffering=0) as f:
        f.seek(shard.start)
        while left:
            got = f.readinto(view[: min(left, len(buf))])
            if not got:
                raise ValueError("file ends before its data")
            h.update(view[:got])
            left -= got
    return h.hexdigest()


def compact(feats: Tensor, dtype: str) -> Tensor:
    """Features in their storage dtype: floats cast to ``dtype``; integer features (pixels) kept as they are.

    Raises:
        ConfigError: (a ``ValueError``) ``dtype`` is unknown, or a float16 cast would turn finite values into
            infinities.
    """
    if dtype not in STORAGE:
        raise ConfigError(f"feature dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    if not feats.is_floating_point() or feats.dtype == STORAGE[dtype]:
        return feats
    out = feats.to(STORAGE[dtype])
    if dtype == "float16" and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(feats).all()):
        big = float(feats.abs().max())
        raise ConfigError(
            f"backbone features reach {big:.4g}, beyond float16's range (65504): "
            "set encoder.feature_dtype=bfloat16 (same size on disk, float32's range)"
        )
    return out


class StoredFeatures:
    """A feature bank's rows, each in a shard file or in an in-memory block; ``features[rows]`` gathers rows.

    Shards of token-level (3-D) features may differ in length; rows are zero-padded along dim 1 to the
    longest, as :meth:`iterwego.encoders.Encoder.featurize` pads its batches. The object holds no open
    files, so it can be used from several threads and pickled (memory blocks travel with it).
    """

    def __init__(self, sources: Sequence[Shard | Tensor], src: np.ndarray, row: np.ndarray):
        self.sources = list(sources)
        self.src, self.row = np.asarray(src, np.int32), np.asarray(row, np.int64)
        shapes = [_shape(s) for s in self.sources]
        dtypes = {s.dtype for s in self.sources}
        if len(dtypes) > 1:
            raise ValueError(f"a feature bank's sources must share one dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop() if dtypes else torch.float32
        tail = shapes[0][1:] if shapes else ()
        if len(tail) == 2:  # token features: pad to the longest source
            tail = (max(s[1] for s in shapes), tail[1])
        self.shape = (len(self.src), *tail)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, rows) -> Tensor:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64).reshape(-1)
        np_dtype = _np_dtype(self.dtype)
        pad = len(self.shape) == 3
        out = (np.zeros if pad else np.empty)((len(rows), *self.shape[1:]), np_dtype)
        src, row = self.src[rows], self.row[rows]
        for s in np.unique(src):
            at = np.flatnonzero(src == s)
            source = self.sources[s]
            if isinstance(source, Tensor):
                block = _numpy(source[torch.from_numpy(row[at])])
            else:
                block = _read_rows(source, row[at])
            if pad:
                out[at, : block.shape[1]] = block
            else:
                out[at] = block
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def to_tensor(self) -> Tensor:
        """Every row in memory (small banks and tests; training gathers batches instead)."""
        return self[np.arange(len(self))]

    def take(self, rows: np.ndarray) -> "StoredFeatures":
        """A view of rows ``rows`` (no data read)."""
        return StoredFeatures(self.sources, self.src[rows], self.row[rows])

    @staticmethod
    def concat(parts: Sequence["StoredFeatures"]) -> "StoredFeatures":
        sources, src, row = [], [], []
        for p in parts:
            src.append(p.src + len(sources))
            row.append(p.row)
            sources += p.sources
        return StoredFeatures(sources, np.concatenate(src) if src else [], np.concatenate(row) if row else [])


def _shape(source: Shard | Tensor) -> tuple[int, ...]:
    return tuple(source.shape)


def _numpy(t: Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype rows are assembled in (bfloat16 as its raw 16 bits)."""
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def _read_rows(shard: Shard, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a shard, one read per run of consecutive rows, in the order asked."""
    np_dtype = _CODES[shard.code][0]
    rb = shard.row_bytes
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    buf = bytearray(len(rows) * rb)
    view = memoryview(buf)
    breaks = np.flatnonzero(np.diff(srt) != 1) + 1
    with open(shard.path, "rb", buffering=0) as f:
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(srt)]):
            f.seek(shard.start + int(srt[a]) * rb)
            want, got = (b - a) * rb, 0
            while got < want:
                n = f.readinto(view[a * rb + got : b * rb])
                if not n:
                    raise DataError(
                        "stored features end early (the file changed after it was checked); "
                        "delete it and rerun to rebuild it",
                        path=shard.path,
                    )
                got += n
    block = np.frombuffer(buf, np_dtype).reshape(len(rows), *shard.shape[1:])
    out = np.empty_like(block)
    out[order] = block
    return out
