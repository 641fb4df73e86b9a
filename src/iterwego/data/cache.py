"""On-disk cache of backbone features, so a frozen backbone runs once per item across runs.

Layout under ``root``::

    v1/<identity-slug>-<sha256(identity)[:16]>/
        identity.txt                 the backbone identity, for humans
        <sha256(keys)[:32]>.safetensors
                                     one shard: tensor "features" (rows) and metadata
                                     {"format", "identity", "keys": JSON list, "sha256"}

A row's key is :func:`iterwego.encoders.content_key` (the item's content hash
plus the backbone identity, which names the preprocessing), so editing an
image, or changing the backbone or its preprocessing, simply misses. The
shard headers are the index: they are read once per process (cheap; the
tensor data is not touched) and re-read only when a shard file changes.

Shards are written once, to a temporary file that is then renamed over the
content-derived name, so readers never see a partial file and several
processes (DataLoader workers, parallel runs) may fill the same cache at the
same time: two writers of the same rows produce the same name and either
complete file wins. A shard that cannot be parsed or whose checksum does not
match is reported with a :class:`CacheWarning`, removed and recomputed. A
cache directory that cannot be written is reported once; features are then
computed (and existing shards still read) without storing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..encoders import content_key
from ..errors import ImageError

FORMAT = "iterwego-feature-cache/1"
LAYOUT = "v1"  # bump with FORMAT when shards change incompatibly; old trees are then ignored, not misread
_STALE_TMP_S = 24 * 3600  # temporary files older than this were left by a crashed writer


class CacheWarning(UserWarning):
    """A feature-cache problem that was worked around (corrupt shard rebuilt, directory not writable)."""


def _tensor_digest(t: Tensor) -> str:
    # Hash the raw bytes: any dtype (uint8 pixels, float features) viewed as bytes without a copy.
    flat = t.contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _slug(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("_")[:48]


class FeatureCache:
    """Backbone features stored on disk, keyed by item content and backbone identity.

    ``get_or_compute(encoder, items)`` is what :class:`iterwego.data.features.FeatureBank`
    calls; rows of the result align with ``items``. The object holds no open
    files and pickles without its in-memory index, so it can be handed to
    DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, shard_size: int = 1024):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.root = Path(root) if root is not None else self.default_root()
        self.shard_size = shard_size
        self.stats = {"hits": 0, "misses": 0, "rebuilt": 0}
        self._reset_memory()
        self._writable = True

    def _reset_memory(self) -> None:
        self._index: dict[str, dict[str, tuple[str, int]]] = {}  # identity dir -> key -> (shard, row)
        self._members: dict[str, dict[str, list[str]]] = {}  # identity dir -> shard -> its keys
        self._seen: dict[str, dict[str, tuple[int, int, int]]] = {}  # identity dir -> shard -> stat signature read
        self._verified: set[tuple[str, tuple[int, int, int]]] = set()  # shard paths whose checksum matched here

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_index", "_members", "_seen", "_verified"):
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

    def identity_dir(self, identity: str) -> Path:
        """The directory holding every shard of one backbone identity."""
        return self.root / LAYOUT / f"{_slug(identity)}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"

    @staticmethod
    def keys(encoder, items: Sequence[str]) -> list[str]:
        """Cache key of each item (content hash + backbone identity); image files are read and hashed."""
        is_file = encoder.modality == "image"
        out = []
        for it in items:
            try:
                out.append(content_key(it, encoder.identity, is_file=is_file))
            except OSError as err:
                raise ImageError(f"cannot read image ({err.strerror or err})", path=str(it)) from None
        return out

    # ------------------------------------------------------------------ main entry
    def get_or_compute(self, encoder, items: Sequence[str], progress: bool = False) -> Tensor:
        """Features of ``items`` (rows aligned with ``items``), computing and storing only the missing ones.

        Token-level (3-D) features from different shards are zero-padded along
        dim 1 to the longest, as :meth:`iterwego.encoders.Encoder.featurize` pads its batches.
        """
        items = list(items)
        if not items:
            return torch.empty(0)
        d = self.identity_dir(encoder.identity)
        keys = self.keys(encoder, items)
        first: dict[str, int] = {}
        for k in keys:
            first.setdefault(k, len(first))
        uniq = list(first)
        slot = np.fromiter((first[k] for k in keys), np.int64, len(keys))  # output row -> unique key

        index = self._refresh(d)
        parts: list[tuple[np.ndarray, Tensor]] = []  # (unique-key ids, their rows)
        by_shard: dict[str, list[int]] = {}
        for u, k in enumerate(uniq):
            hit = index.get(k)
            if hit is not None:
                by_shard.setdefault(hit[0], []).append(u)
        got = np.zeros(len(uniq), bool)
        for shard, us in by_shard.items():
            t = self._load(d, shard)
            if t is None:
                continue
            rows = torch.as_tensor([index[uniq[u]][1] for u in us])
            parts.append((np.asarray(us), t[rows]))
            got[us] = True
        self.stats["hits"] += int(got.sum())

        missing = np.flatnonzero(~got)
        self.stats["misses"] += len(missing)
        if len(missing):
            item_of: dict[str, str] = {}
            for it, k in zip(items, keys):
                item_of.setdefault(k, it)
            chunks = [missing[s : s + self.shard_size] for s in range(0, len(missing), self.shard_size)]
            bar = None
            if progress and len(chunks) > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(missing), desc=f"encode {encoder.modality}", leave=False)
            for ch in chunks:
                ks = [uniq[u] for u in ch]
                feats = encoder.featurize([item_of[k] for k in ks], progress=progress and bar is None)
                parts.append((ch, feats))
                if self._writable:
                    self._store(d, encoder.identity, ks, feats)
                if bar is not None:
                    bar.update(len(ch))
            if bar is not None:
                bar.close()
        out = _assemble(parts, len(uniq))
        return out if len(uniq) == len(keys) else out[torch.from_numpy(slot)]  # no copy unless items repeat

    # ------------------------------------------------------------------ reading
    def _refresh(self, d: Path) -> dict[str, tuple[str, int]]:
        """Add the keys of shards that are new or changed since the last look to the in-memory index."""
        index = self._index.setdefault(d.name, {})
        seen = self._seen.setdefault(d.name, {})
        try:
            entries = list(os.scandir(d))
        except OSError:  # no cache yet (or not a directory): everything misses
            return index
        now = time.time()
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith(".tmp-"):
                self._drop_stale_tmp(e, now)
                continue
            if not e.name.endswith(".safetensors"):
                continue
            try:
                st = e.stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
            if seen.get(e.name) == sig:
                continue
            self._forget(d, e.name)  # a replaced shard may hold other rows
            seen[e.name] = sig
            keys = self._read_keys(Path(e.path))
            if keys is not None:
                self._add(d, e.name, keys)
        return index

    def _add(self, d: Path, shard: str, keys: list[str]) -> None:
        index = self._index.setdefault(d.name, {})
        self._members.setdefault(d.name, {})[shard] = keys
        for r, k in enumerate(keys):
            index.setdefault(k, (shard, r))

    def _read_keys(self, path: Path) -> list[str] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shape = f.get_slice("features").get_shape()
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            keys = json.loads(meta["keys"])
            if not isinstance(keys, list) or len(keys) != shape[0] or "sha256" not in meta:
                raise ValueError("index does not match the stored rows")
            return keys
        except FileNotFoundError:  # removed by another process since the listing
            return None
        except Exception as err:  # any parse failure means a damaged file
            self._discard(path, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
            return None

    def _load(self, d: Path, shard: str) -> Tensor | None:
        """A shard's rows, checksum-verified once per process; ``None`` if it is gone or damaged."""
        from safetensors import safe_open

        path = d / shard
        try:
            st = path.stat()
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
            with safe_open(str(path), framework="pt") as f:
                want = (f.metadata() or {}).get("sha256")
                t = f.get_tensor("features")
            if (str(path), sig) not in self._verified:
                if _tensor_digest(t) != want:
                    raise ValueError("checksum mismatch")
                self._verified.add((str(path), sig))
            return t
        except FileNotFoundError:
            self._forget(d, shard)
            return None
        except Exception as err:
            self._discard(path, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
            return None

    def _forget(self, d: Path, shard: str) -> None:
        index = self._index.get(d.name, {})
        for k in self._members.get(d.name, {}).pop(shard, ()):
            if index.get(k, ("",))[0] == shard:
                del index[k]
        self._seen.get(d.name, {}).pop(shard, None)

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
            st = path.stat()
            self._seen.setdefault(path.parent.name, {})[path.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
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
    def _store(self, d: Path, identity: str, keys: list[str], feats: Tensor) -> None:
        from safetensors.torch import save

        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32] + ".safetensors"
        path = d / name
        feats = feats.detach().cpu().contiguous()
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "identity.txt").exists():
                _atomic_write(d / "identity.txt", (identity + "\n").encode())
            if not path.exists():  # write-once: an existing file with this name holds these very rows
                meta = {
                    "format": FORMAT,
                    "identity": identity,
                    "keys": json.dumps(keys),
                    "sha256": _tensor_digest(feats),
                }
                _atomic_write(path, save({"features": feats}, metadata=meta))
        except OSError as err:
            self._writable = False
            warnings.warn(
                f"iterwego feature cache: cannot write to {self.root} ({err.strerror or type(err).__name__}); "
                "computing features without caching",
                CacheWarning,
                stacklevel=4,
            )
            return
        try:
            st = path.stat()
        except OSError:  # removed by another process's corruption check: it is rewritten next time
            return
        self._forget(d, name)
        self._seen.setdefault(d.name, {})[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._add(d, name, keys)


def _atomic_write(path: Path, data: bytes) -> None:
    from ..io import atomic_write_bytes  # one home for atomic writes (WriteError is an OSError too)

    atomic_write_bytes(path, data)


def _assemble(parts: list[tuple[np.ndarray, Tensor]], n: int) -> Tensor:
    """Scatter row blocks into one ``(n, ...)`` tensor; 3-D blocks are zero-padded along dim 1."""
    ref = parts[0][1]
    if ref.dim() == 3:
        L = max(t.shape[1] for _, t in parts)
        out = torch.zeros((n, L, ref.shape[2]), dtype=ref.dtype)
        for ids, t in parts:
            out[torch.from_numpy(ids), : t.shape[1]] = t.to(ref.dtype)
        return out
    out = torch.empty((n, *ref.shape[1:]), dtype=ref.dtype)
    for ids, t in parts:
        out[torch.from_numpy(ids)] = t.to(ref.dtype)
    return out
