"""The on-disk feature cache: hits equal recomputation, invalidation, corruption, concurrency, read-only fallback."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from floats import assert_float32_close
from iterwego.config import EncoderConfig, OrdererConfig
from iterwego.data import cache as cache_mod
from iterwego.data.cache import CacheWarning, FeatureCache
from iterwego.data.features import FeatureBank
from iterwego.encoders import Encoder, L2Head, build_encoder
from iterwego.errors import ImageError
from iterwego.model import Orderer

SMALL = OrdererConfig(d_model=16, layers=1, heads=2, ffn=32, dropout=0.1)
SENTENCES = [
    "the red circle waits by the tank.",
    "hour seven: a green square looks at the water.",
    "a cat.",
    "then it rained all day long on the old blue house.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: extra threads only contend


def write_pngs(d: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        p = d / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (30 + k, 40, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def cnn(size: int = 32) -> Encoder:
    return build_encoder("image", EncoderConfig(image="cnn", image_size=size), 16)


class Counting:
    """Wraps ``encoder.featurize`` and records the items of every call."""

    def __init__(self, encoder: Encoder):
        self.calls: list[list[str]] = []
        self._inner = encoder.featurize
        encoder.featurize = self

    def __call__(self, items, *a, **kw):
        self.calls.append(list(items))
        return self._inner(items, *a, **kw)

    @property
    def items(self) -> list[str]:
        return [it for c in self.calls for it in c]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return build_encoder("text", EncoderConfig(text="minilm"), 16)


def logits(orderer: Orderer, feats: torch.Tensor) -> torch.Tensor:
    orderer.eval()
    with torch.no_grad():
        return orderer(feats, torch.arange(len(feats))[None])


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("v2/*/*.safetensors"))


# --------------------------------------------------------------------------- hits
def test_image_hit_equals_recompute_and_skips_the_backbone(tmp_path):
    paths = write_pngs(tmp_path / "img", 4)
    enc = cnn()
    cold = FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    count = Counting(enc)
    hit = FeatureCache(tmp_path / "c").get_or_compute(enc, paths[::-1] + paths[:1])  # fresh instance: read from disk
    assert count.calls == []
    fresh = cnn().featurize(paths[::-1] + paths[:1])
    # exact: the cnn encoder's features are decoded uint8 pixels (no float arithmetic), and the orderer then runs
    # one computation in one shape on one machine
    assert hit.dtype == fresh.dtype and torch.equal(hit, fresh) and torch.equal(cold, fresh[[3, 2, 1, 0]])
    torch.manual_seed(0)
    orderer = Orderer(enc, SMALL)
    assert torch.equal(logits(orderer, hit), logits(orderer, fresh))


def test_text_hit_equals_recompute_and_partial_hit_computes_only_new_items(tmp_path, minilm):
    c = FeatureCache(tmp_path / "c")
    c.get_or_compute(minilm, SENTENCES[:2])
    count = Counting(minilm)
    try:
        got = FeatureCache(tmp_path / "c").get_or_compute(minilm, SENTENCES)
        assert count.items == SENTENCES[2:]
        again = FeatureCache(tmp_path / "c").get_or_compute(minilm, SENTENCES)
        assert len(count.calls) == 1
    finally:
        minilm.featurize = count._inner
    fresh = minilm.featurize(SENTENCES)
    # a hit returns the stored bytes (exact); the partial hit's first two features were computed in a batch of two,
    # fresh ones in a batch of three: MiniLM's 6 layers (~30 reductions in series) padded to other lengths, at the
    # scale of the normalised features (1), then the orderer's ~4 more on top at the logits' scale
    assert torch.equal(again, got)
    assert_float32_close(got, fresh, ulps=128)
    torch.manual_seed(0)
    orderer = Orderer(minilm, SMALL)
    assert torch.equal(logits(orderer, again), logits(orderer, got))
    assert_float32_close(logits(orderer, again), logits(orderer, fresh), ulps=128)


def test_feature_bank_with_cache_matches_without(tmp_path):
    paths = write_pngs(tmp_path / "img", 3)
    banks = [FeatureBank(cnn(), cache) for cache in (None, FeatureCache(tmp_path / "c"), FeatureCache(tmp_path / "c"))]
    out = []
    for b in banks:
        b.rows(paths[:2])
        b.build()
        b.rows(paths[1:])
        out.append(b.build())
    assert torch.equal(out[0], out[1].to_tensor()) and torch.equal(out[0], out[2].to_tensor())


# --------------------------------------------------------------------------- invalidation
def test_changed_identity_misses(tmp_path, minilm):
    paths = write_pngs(tmp_path / "img", 3)
    FeatureCache(tmp_path / "c").get_or_compute(cnn(32), paths)
    enc40 = cnn(40)
    count = Counting(enc40)
    got = FeatureCache(tmp_path / "c").get_or_compute(enc40, paths)
    assert count.items == paths and got.shape[-1] == 40
    FeatureCache(tmp_path / "c").get_or_compute(minilm, SENTENCES)
    longer = build_encoder("text", EncoderConfig(text="minilm", text_max_length=20), 16)
    count = Counting(longer)
    FeatureCache(tmp_path / "c").get_or_compute(longer, SENTENCES)
    assert count.items == SENTENCES


def test_changed_file_bytes_miss(tmp_path):
    paths = write_pngs(tmp_path / "img", 3)
    enc = cnn()
    FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(paths[1])  # same name, new picture
    count = Counting(enc)
    got = FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    assert count.items == [paths[1]]
    assert torch.equal(got, cnn().featurize(paths))


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        FeatureCache(tmp_path / "c").get_or_compute(cnn(), [str(tmp_path / "nope.png")])


# --------------------------------------------------------------------------- corruption
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_data(p: Path) -> None:  # header intact, tensor bytes changed: only the checksum can tell
    b = bytearray(p.read_bytes())
    for k in range(len(b) - 64, len(b)):
        b[k] ^= 0xFF
    p.write_bytes(bytes(b))


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


@pytest.mark.parametrize("damage", [_truncate, _flip_data, _garbage], ids=["truncated", "bitflip", "garbage"])
def test_corrupt_shard_is_detected_and_rebuilt(tmp_path, damage):
    paths = write_pngs(tmp_path / "img", 3)
    enc = cnn()
    FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    [shard] = shards(tmp_path / "c")
    damage(shard)
    count = Counting(enc)
    with pytest.warns(CacheWarning, match="corrupt"):
        got = FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    assert count.items == paths
    assert torch.equal(got, cnn().featurize(paths))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # the rebuilt shard is sound
        again = FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    assert len(count.calls) == 1 and torch.equal(again, got)


# --------------------------------------------------------------------------- concurrency
def _writer(root: str, paths: list[str], barrier, rounds: int) -> list[np.ndarray]:
    warnings.simplefilter("error", CacheWarning)  # a reader seeing a partial file would raise here
    torch.set_num_threads(1)
    enc = cnn()
    out = []
    barrier.wait()
    for r in range(rounds):
        order = paths if r % 2 == 0 else paths[::-1]
        feats = FeatureCache(root, shard_size=2).get_or_compute(enc, order)
        out.append(feats[np.argsort([order.index(p) for p in paths])].numpy())
    return out


def test_concurrent_writers_leave_a_consistent_cache(tmp_path):
    paths = write_pngs(tmp_path / "img", 9)
    root = str(tmp_path / "c")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(_writer, (root, paths, barrier, 6)) for _ in range(2)]
            results = [j.get(timeout=120) for j in jobs]
    want = cnn().featurize(paths).numpy()
    for res in results:
        for feats in res:
            np.testing.assert_array_equal(feats, want)
    assert not [p for p in Path(root).rglob("*") if p.name.startswith(".tmp-")]
    enc = cnn()
    count = Counting(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        got = FeatureCache(root).get_or_compute(enc, paths)
    assert count.calls == [] and np.array_equal(got.numpy(), want)


# --------------------------------------------------------------------------- unwritable
def _fallback_checks(root: Path, paths: list[str]) -> None:
    enc = cnn()
    c = FeatureCache(root)
    with pytest.warns(CacheWarning) as rec:
        a = c.get_or_compute(enc, paths)
        b = c.get_or_compute(enc, paths[::-1])
    msgs = [str(w.message) for w in rec if issubclass(w.category, CacheWarning)]
    assert len(msgs) == 1 and str(root) in msgs[0] and "\n" not in msgs[0]  # one line, once
    assert torch.equal(a, cnn().featurize(paths)) and torch.equal(b, a.flip(0))


def test_read_only_directory_falls_back_with_one_warning(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        _fallback_checks(root, write_pngs(tmp_path / "img", 3))
    finally:
        root.chmod(0o700)


def test_root_that_cannot_exist_falls_back(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    _fallback_checks(tmp_path / "file" / "cache", write_pngs(tmp_path / "img", 3))


def test_read_only_filesystem_still_serves_hits(tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "img", 4)
    FeatureCache(tmp_path / "c").get_or_compute(cnn(), paths[:2])

    def refuse(path, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod, "_atomic_write", refuse)
    enc = cnn()
    count = Counting(enc)
    with pytest.warns(CacheWarning, match="cannot write"):
        got = FeatureCache(tmp_path / "c").get_or_compute(enc, paths)
    assert count.items == paths[2:] and torch.equal(got, cnn().featurize(paths))


# --------------------------------------------------------------------------- token features, properties
class TokenBackbone:
    """Variable-length token features: one position per character, zero-padded per call."""

    modality = "text"
    identity = "fake-tokens:v1"

    def featurize(self, items):
        L = max(len(s) for s in items)
        out = torch.zeros(len(items), L, 2)
        for k, s in enumerate(items):
            out[k, : len(s), 0] = torch.tensor([float(ord(ch)) for ch in s])
            out[k, : len(s), 1] = 1.0
        return out


def token_encoder() -> Encoder:
    return Encoder("text", "fake", TokenBackbone(), lambda: L2Head(2), 2)


def padded(t: torch.Tensor, L: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1]))


def test_token_features_of_different_lengths_are_padded_on_assembly(tmp_path):
    enc = token_encoder()
    items = ["ab", "abcdefgh", "abc"]
    FeatureCache(tmp_path / "c").get_or_compute(enc, items[:1])  # a shard of length 2
    FeatureCache(tmp_path / "c").get_or_compute(enc, items[1:])  # a shard of length 8
    count = Counting(enc)
    got = FeatureCache(tmp_path / "c").get_or_compute(enc, items)
    assert count.calls == [] and got.shape == (3, 8, 2)
    assert torch.equal(got, token_encoder().featurize(items))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    warm=st.lists(st.integers(0, 7), max_size=8),
    ask=st.lists(st.integers(0, 7), min_size=1, max_size=12),
    shard_size=st.integers(1, 4),
)
def test_rows_align_with_items_whatever_is_cached(warm, ask, shard_size):
    pool = ["w" * (k + 1) + str(k) for k in range(8)]
    enc = token_encoder()
    with tempfile.TemporaryDirectory() as d:
        if warm:
            FeatureCache(d, shard_size=shard_size).get_or_compute(enc, [pool[k] for k in warm])
        c = pickle.loads(pickle.dumps(FeatureCache(d, shard_size=shard_size)))  # what a DataLoader worker gets
        items = [pool[k] for k in ask]
        got = c.get_or_compute(enc, items)
        want = token_encoder().featurize(items)
        L = max(got.shape[1], want.shape[1])
        assert torch.equal(padded(got, L), padded(want, L))
        assert c.stats["hits"] == len(set(ask) & set(warm)) and c.stats["misses"] == len(set(ask) - set(warm))


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ITERWEGO_CACHE", str(tmp_path / "env"))
    assert FeatureCache.default_root() == tmp_path / "env" and FeatureCache().root == tmp_path / "env"
    monkeypatch.delenv("ITERWEGO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert FeatureCache.default_root() == tmp_path / "home" / ".cache" / "iterwego"
