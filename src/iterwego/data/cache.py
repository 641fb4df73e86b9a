"""On-disk cache of backbone features: the feature store training and evaluation read their batches from.

A frozen backbone runs once per item across runs; what it produced is written once, in a compact dtype
(``encoder.feature_dtype``: float16 by default, bfloat16 or float32; pixels stay uint8), and read back row by
row through :class:`iterwego.data.store.StoredFeatures`, so host memory does not grow with the dataset.

Layout under ``root``::

    v2/<identity-slug>-<sha256(identity, dtype)[:16]>/
        identity.txt                 the backbone identity and storage dtype, for humans
        <sha256(keys)[:32]>.safetensors
                                     one shard: tensor "features" (rows) and metadata
                                     {"format", "identity", "keys": JSON list, "sha256"}

A row's key is :func:`iterwego.encoders.content_key` (the item's content hash
plus the backbone identity, which names the preprocessing), so editing an
image, or changing the backbone or its preprocessing, simply misses; a
different storage dtype is a different directory. The shard headers are the
index: they are read once per process (cheap; the tensor data is not
touched) and re-read only when a shard file changes.

Shards are written once, to a temporary file that is then renamed over the
content-derived name, so readers never see a partial file and several
processes (data-parallel ranks, parallel runs) may fill the same cache at the
same time: two writers of the same rows produce the same name and either
complete file wins. Missing items are encoded in chunks of ``shard_size``
(a multiple of the encoders' batch of 64) in a fixed order, so a run killed
while filling the store and started again computes exactly the chunks it
had not written, with the same batches, and ends with the same features.

Before a shard's rows are used its checksum is verified (streamed, once per
process and file version; shards this process wrote are known good). A shard
that cannot be parsed or whose checksum does not match is reported with a
:class:`CacheWarning`, removed and recomputed. A cache directory that cannot
be written is reported once; features are then computed and held in memory
(existing shards are still read) without storing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import Tensor

from ..encoders import content_key
from ..errors import ImageError
from .store import Shard, StoredFeatures, compact, read_shard, shard_digest

FORMAT = "iterwego-feature-cache/2"
LAYOUT = "v2"  # bump with FORMAT when shards change incompatibly; old trees are then ignored, not misread
SHARD_ROWS = 1024  # rows per shard; a multiple of the encoders' batch, so chunking never changes a batch
_STALE_TMP_S = 24 * 3600  # temporary files older than this were left by a crashed writer


class CacheWarning(UserWarning):
    """A feature-cache problem that was worked around (corrupt shard rebuilt, directory not writable)."""


def _slug(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("_")[:48]


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class FeatureCache:
    """Backbone features stored on disk, keyed by item content and backbone identity.

    :meth:`ensure` is what :class:`iterwego.data.features.FeatureBank` calls: it stores whatever is
    missing and returns a :class:`~iterwego.data.store.StoredFeatures` view whose rows align with the
    items; :meth:`get_or_compute` is the same, read whole into memory. The object holds no open files
    and pickles without its in-memory index.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, shard_size: int | None = None):
        shard_size = SHARD_ROWS if shard_size is None else shard_size
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.root = Path(root) if root is not None else self.default_root()
        self.shard_size = shard_size
        self.stats = {"hits": 0, "misses": 0, "rebuilt": 0}
        self._reset_memory()
        self._writable = True

    def _reset_memory(self) -> None:
        # keys are held as fixed-size byte arrays, not Python strings: at SIND's size a dict of 200,000
        # strings per bank costs about 100 MB and fragments the heap for the rest of the run
        self._keys: dict[str, dict[str, np.ndarray]] = {}  # identity dir -> shard -> its keys (S64)
        self._shards: dict[str, dict[str, Shard]] = {}  # identity dir -> shard -> where its rows lie
        self._seen: dict[str, dict[str, tuple[int, int, int]]] = {}  # identity dir -> shard -> stat signature read
        self._merged: dict[str, tuple] = {}  # identity dir -> (sorted keys, shard names, shard of each, row of each)
        self._verified: set[tuple[str, tuple[int, int, int]]] = set()  # shard paths whose checksum matched here

    def _release(self, d: Path) -> None:
        """Drop a directory's in-memory index (re-read from the headers when next needed)."""
        for table in (self._keys, self._shards, self._seen, self._merged):
            table.pop(d.name, None)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_keys", "_shards", "_seen", "_merged", "_verified"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_memory()

    @staticmethod
    def default_root() -> Path:
        """``$ITERWEGO_CACHE`` if set, else ``~/.cache/iterwego``."""
        env = os.environ.get("ITERWEGO_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "iterwego"

    def identity_dir(self, identity: str, dtype: str = "float32") -> Path:
        """The directory holding every shard of one backbone identity stored in one dtype."""
        digest = hashlib.sha256(f"{identity}\0{dtype}".encode()).hexdigest()[:16]
        return self.root / LAYOUT / f"{_slug(identity)}-{digest}"

    @staticmethod
    def keys(encoder, items: Sequence[str]) -> np.ndarray:
        """Cache key of each item (content hash + backbone identity, 64 hex digits as bytes); image files are
        read and hashed. Filled in place: a list of 200,000 strings would cost ten times the memory."""
        is_file = encoder.modality == "image"
        out = np.empty(len(items), "S64")
        for i, it in enumerate(items):
            try:
                out[i] = content_key(it, encoder.identity, is_file=is_file)
            except OSError as err:
                raise ImageError(f"cannot read image ({err.strerror or err})", path=str(it)) from None
        return out

    # ------------------------------------------------------------------ main entry
    def get_or_compute(self, encoder, items: Sequence[str], progress: bool = False, dtype: str = "float32") -> Tensor:
        """Features of ``items`` in memory (rows aligned with ``items``); only the missing ones are computed."""
        return self.ensure(encoder, items, dtype=dtype, progress=progress).to_tensor()

    def ensure(
        self,
        encoder,
        items: Sequence[str],
        *,
        dtype: str = "float32",
        progress: bool = False,
        share: tuple[int, int] = (0, 1),
        sync: Callable[[], None] | None = None,
    ) -> StoredFeatures:
        """Store whatever ``items`` lack and return a view of their features (rows aligned with ``items``).

        ``share=(rank, world)`` with ``sync`` (a barrier): data-parallel processes split the work, each
        verifying every W-th shard it reads and encoding every W-th missing chunk, then read each other's.
        """
        items = list(items)
        if not items:
            return StoredFeatures([], [], [])
        rank, world = share
        barrier = sync if world > 1 and sync is not None else (lambda: None)
        d = self.identity_dir(encoder.identity, dtype)
        keys = self.keys(encoder, items)
        uniq, first, slot = _first_occurrences(keys)
        todo = (uniq, [items[i] for i in first])
        barrier()  # every process lists the same shards before any of them discards a corrupt one
        self._verify_stored(d, uniq, rank, world)
        barrier()
        missing = self._missing(d, uniq)
        self.stats["hits"] += len(uniq) - len(missing)
        self.stats["misses"] += len(missing)
        mine = [c for i, c in enumerate(self._chunks(missing)) if i % world == rank]
        memory = self._fill(encoder, d, dtype, todo, mine, progress)
        if world > 1:  # read the others' chunks; encode here any another process could not store
            barrier()
            memory += self._fill(encoder, d, dtype, todo, self._chunks(self._missing(d, uniq, memory)), progress)
        view = self._view(d, uniq, memory)
        self._release(d)
        return view if len(uniq) == len(keys) else view.take(slot)

    def _verify_stored(self, d: Path, uniq: np.ndarray, rank: int, world: int) -> None:
        """Check the shards holding any of ``uniq`` (every ``world``-th, from ``rank``)."""
        self._refresh(d)
        found, shard_of, _ = self._lookup(d, uniq)
        names = self._merged[d.name][1]
        self._verify(d, sorted({names[i] for i in np.unique(shard_of[found])}), rank, world)

    def _missing(self, d: Path, uniq: np.ndarray, memory: list = ()) -> np.ndarray:
        """Ids of the keys in no shard on disk (and not in ``memory``), in order."""
        self._refresh(d)
        absent = ~self._lookup(d, uniq)[0]
        for ids, _ in memory:
            absent[ids] = False
        return np.flatnonzero(absent)

    def _chunks(self, ids: np.ndarray) -> list[np.ndarray]:
        return [ids[s : s + self.shard_size] for s in range(0, len(ids), self.shard_size)]

    def _fill(self, encoder, d: Path, dtype: str, todo, chunks, progress: bool) -> list:
        """Encode ``chunks`` (unique-key ids into ``todo = (keys, items)``) and store each as a shard;
        returns the chunks it could not store, with their features."""
        memory: list[tuple[np.ndarray, Tensor]] = []
        if not chunks:
            return memory
        bar = None
        if progress and len(chunks) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(c) for c in chunks), desc=f"encode {encoder.modality}", leave=False)
        uniq, items = todo
        for ch in chunks:
            ks = [k.decode() for k in uniq[ch]]
            feats = compact(encoder.featurize([items[u] for u in ch], progress=progress and bar is None), dtype)
            if not (self._writable and self._store(d, f"{encoder.identity} ({dtype})", ks, feats)):
                memory.append((ch, feats))
            if bar is not None:
                bar.update(len(ch))
        if bar is not None:
            bar.close()
        return memory

    def _view(self, d: Path, uniq: np.ndarray, memory: list) -> StoredFeatures:
        found, shard_of, rows = self._lookup(d, uniq)
        names = self._merged[d.name][1]
        used = np.unique(shard_of[found])
        sources: list = [self._shards[d.name][names[i]] for i in used]
        src = np.full(len(uniq), -1, np.int32)
        src[found] = np.searchsorted(used, shard_of[found])
        row = np.where(found, rows, 0)
        for ids, t in memory:
            src[ids], row[ids] = len(sources), np.arange(len(ids))
            sources.append(t)
        assert (src >= 0).all(), "every item is stored or held in memory"
        return StoredFeatures(sources, src, row)

    # ------------------------------------------------------------------ reading
    def _lookup(self, d: Path, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found, shard number, row)`` of each key; shard numbers index ``self._merged[d.name][1]``."""
        merged = self._merged.get(d.name)
        if merged is None:
            names = sorted(self._keys.get(d.name, {}))
            parts = [self._keys[d.name][n] for n in names]
            allkeys = np.concatenate(parts) if parts else np.empty(0, "S64")
            shard = np.repeat(np.arange(len(names), dtype=np.int32), [len(p) for p in parts])
            row = np.concatenate([np.arange(len(p), dtype=np.int32) for p in parts]) if parts else shard
            srt = np.argsort(allkeys, kind="stable")  # a key in two shards: the first shard by name wins
            merged = self._merged[d.name] = (allkeys[srt], names, shard[srt], row[srt])
        allkeys, _, shard, row = merged
        if not len(allkeys):
            z = np.zeros(len(keys), np.int64)
            return np.zeros(len(keys), bool), z, z
        at = np.minimum(np.searchsorted(allkeys, keys), len(allkeys) - 1)
        return allkeys[at] == keys, shard[at].astype(np.int64), row[at].astype(np.int64)

    def _refresh(self, d: Path) -> None:
        """Bring the in-memory index up to date with the shards on disk (new, changed or removed files)."""
        seen = self._seen.setdefault(d.name, {})
        try:
            entries = list(os.scandir(d))
        except OSError:  # no cache yet (or not a directory): everything misses
            entries = []
        now = time.time()
        present = set()
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith(".tmp-"):
                self._drop_stale_tmp(e, now)
                continue
            if not e.name.endswith(".safetensors"):
                continue
            try:
                sig = _sig(e.stat())
            except OSError:
                continue
            present.add(e.name)
            if seen.get(e.name) == sig:
                continue
            self._forget(d, e.name)  # a replaced shard may hold other rows
            seen[e.name] = sig
            got = self._read_header(Path(e.path))
            if got is not None:
                self._add(d, e.name, *got)
        for name in [n for n in seen if n not in present]:  # removed by another process
            self._forget(d, name)

    def _add(self, d: Path, name: str, shard: Shard, keys: np.ndarray) -> None:
        self._keys.setdefault(d.name, {})[name] = keys
        self._shards.setdefault(d.name, {})[name] = shard
        self._merged.pop(d.name, None)

    def _read_header(self, path: Path) -> tuple[Shard, np.ndarray] | None:
        try:
            shard, meta = read_shard(path)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            keys = json.loads(meta["keys"])
            if not isinstance(keys, list) or len(keys) != shard.shape[0] or "sha256" not in meta:
                raise ValueError("index does not match the stored rows")
            return shard, np.array(keys, dtype="S64")
        except FileNotFoundError:  # removed by another process since the listing
            return None
        except Exception as err:  # any parse failure means a damaged file
            self._discard(path, _reason(err))
            return None

    def _verify(self, d: Path, names: list[str], rank: int = 0, world: int = 1) -> None:
        """Check the checksum of every ``world``-th shard in ``names`` (once per process and file version)."""
        for i, name in enumerate(names):
            if i % world != rank:
                continue
            path = d / name
            try:
                sig = _sig(path.stat())
                if (str(path), sig) in self._verified:
                    continue
                shard, meta = read_shard(path)
                if shard_digest(shard) != meta.get("sha256"):
                    raise ValueError("checksum mismatch")
                self._verified.add((str(path), sig))
            except FileNotFoundError:
                self._forget(d, name)
            except Exception as err:
                self._discard(path, _reason(err))

    def _forget(self, d: Path, shard: str) -> None:
        for table in (self._keys, self._shards, self._seen):
            table.get(d.name, {}).pop(shard, None)
        self._merged.pop(d.name, None)

    def _discard(self, path: Path, reason: str) -> None:
        warnings.warn(
            f"iterwego feature cache: {path} is corrupt ({reason}); recomputing its features",
            CacheWarning,
            stacklevel=4,
        )
        self.stats["rebuilt"] += 1
        self._forget(path.parent, path.name)
        try:
            path.unlink()
        except OSError:  # read-only cache or already gone: the rows are recomputed either way
            pass
        # remember the damaged file's signature so it is not re-read (and re-reported) until it changes
        try:
            self._seen.setdefault(path.parent.name, {})[path.name] = _sig(path.stat())
        except OSError:
            pass

    @staticmethod
    def _drop_stale_tmp(e: os.DirEntry, now: float) -> None:
        try:
            if now - e.stat().st_mtime > _STALE_TMP_S:
                os.unlink(e.path)
        except OSError:
            pass

    # ------------------------------------------------------------------ writing
    def _store(self, d: Path, identity: str, keys: list[str], feats: Tensor) -> bool:
        """Write one shard; False (after one warning) when the cache cannot be written."""
        from safetensors.torch import save

        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32] + ".safetensors"
        path = d / name
        feats = feats.detach().cpu().contiguous()
        wrote = False
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "identity.txt").exists():
                _atomic_write(d / "identity.txt", (identity + "\n").encode())
            if not path.exists():  # write-once: an existing file with this name holds these very rows
                digest = hashlib.sha256(_raw_bytes(feats)).hexdigest()
                meta = {"format": FORMAT, "identity": identity, "keys": json.dumps(keys), "sha256": digest}
                _atomic_write(path, save({"features": feats}, metadata=meta))
                wrote = True
        except OSError as err:
            self._writable = False
            warnings.warn(
                f"iterwego feature cache: cannot write to {self.root} ({err.strerror or type(err).__name__}); "
                "computing features without caching (held in memory)",
                CacheWarning,
                stacklevel=5,
            )
            return False
        self._forget(d, name)
        got = self._read_header(path)
        if got is None:  # removed by another process's corruption check: it is rewritten next time
            return False
        try:
            sig = _sig(path.stat())
        except OSError:
            return False
        self._seen.setdefault(d.name, {})[name] = sig
        self._add(d, name, *got)
        if not wrote:  # another process's file with these rows: checked like any shard read
            self._verify(d, [name])
            return name in self._shards.get(d.name, {})
        self._verified.add((str(path), sig))  # these rows came from the backbone just now
        return True


def _first_occurrences(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unique keys, first item of each, unique key of each item)``, keys in order of first appearance:
    the chunking, and with it every encoder batch, depends on the items alone."""
    uk, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    slot = np.empty(len(order), np.int64)
    slot[order] = np.arange(len(order))
    return uk[order], first[order], slot[inverse.reshape(-1)]


def _raw_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes without a copy (any dtype, bfloat16 included)."""
    import torch

    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8))


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def _atomic_write(path: Path, data: bytes) -> None:
    from ..io import atomic_write_bytes  # one home for atomic writes (WriteError is an OSError too)

    atomic_write_bytes(path, data)
