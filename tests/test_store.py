"""The feature store: what training reads equals what the backbones compute, for every encoder kind and dtype."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iterwego.config import EncoderConfig
from iterwego.data.cache import CacheWarning, FeatureCache
from iterwego.data.features import build_features, gather, make_batch, plan_batches
from iterwego.data.readers import Item, Story
from iterwego.data.store import StoredFeatures, compact, read_shard
from iterwego.encoders import build_align_encoders, build_encoder
from iterwego.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

STORIES = 200
WORDS = "the a red old small dog boat park tree walked near after morning day friends".split()


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> list[Story]:
    """200 stories of 5 items; every image and every sentence distinct (as in SIND)."""
    d = tmp_path_factory.mktemp("store-img")
    rng = np.random.default_rng(0)
    out = []
    for s in range(STORIES):
        items = []
        for k in range(5):
            p = d / f"{s}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (12 + k, 16, 3), dtype=np.uint8)).save(p, compress_level=1)
            words = " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
            items.append(Item(image=str(p), sentence=f"{words} number {s * 5 + k} ."))
        out.append(Story(f"s{s}", items))
    return out


def _encoders(kind: str, clip: Path, bert: Path) -> dict:
    if kind == "cnn":
        return {"image": build_encoder("image", EncoderConfig(image="cnn", image_size=16), 8)}
    if kind == "clip-pooled":  # the paper's trainable projection: the store holds the pooled output
        return {"image": build_encoder("image", EncoderConfig(image=f"clip:{clip}"), 8)}
    if kind == "clip-embeds":  # frozen projection: normalised embeddings
        return {"image": build_encoder("image", EncoderConfig(image=f"clip:{clip}", image_train_projection=False), 8)}
    if kind == "bert-pooled":
        return {"text": build_encoder("text", EncoderConfig(text=f"bert:{bert}", text_max_length=24), 8)}
    if kind == "bert-tokens":  # the paper's token-level path: hidden states below the trainable top layer
        return {
            "text": build_encoder(
                "text", EncoderConfig(text=f"bert:{bert}", text_max_length=24, text_train_layers=1), 8
            )
        }
    if kind == "clip-zero-shot":  # the clip aligner's image and text embeddings
        img, txt = build_align_encoders(f"clip:{clip}", EncoderConfig())
        return {"align_image": img, "align_text": txt}
    raise ValueError(kind)


KINDS = [
    ("cnn", "float16"),  # pixels stay uint8 whatever is asked
    ("clip-pooled", "float16"),
    ("clip-embeds", "bfloat16"),
    ("bert-pooled", "float32"),
    ("bert-tokens", "float16"),
    ("clip-zero-shot", "bfloat16"),
]


@pytest.mark.parametrize("kind,dtype", KINDS, ids=[f"{k}-{d}" for k, d in KINDS])
def test_store_rows_equal_direct_features(stories, tiny_clip_dir, tiny_bert_dir, tmp_path, kind, dtype):
    encs = _encoders(kind, tiny_clip_dir, tiny_bert_dir)
    cache = FeatureCache(tmp_path / "store", shard_size=256)  # 1000 items: 4 shards per bank
    for name, enc in encs.items():
        items = [it.image if enc.modality == "image" else it.sentence for s in stories for it in s.items]
        view = cache.ensure(enc, items, dtype=dtype)
        direct = compact(enc.featurize(items), dtype)
        assert isinstance(view, StoredFeatures) and len({s.path for s in view.sources}) == 4
        assert view.dtype == direct.dtype and view.shape == tuple(direct.shape), name
        assert view.dtype == (torch.uint8 if kind == "cnn" else getattr(torch, dtype))
        assert torch.equal(view.to_tensor(), direct), name  # bit for bit, every row
        rows = np.random.default_rng(1).integers(0, len(items), 300)  # random, repeated, across shards
        assert torch.equal(view[rows], direct[torch.from_numpy(rows)]), name
        again = FeatureCache(tmp_path / "store").ensure(enc, items[::-1], dtype=dtype)  # a new process, reversed
        assert torch.equal(again.to_tensor(), direct.flip(0)), name
    assert cache.stats["misses"] == 1000 * len(encs)


def test_training_batches_read_from_the_store_equal_in_memory_batches(stories, tiny_clip_dir, tiny_bert_dir, tmp_path):
    """The batches training sees: gathered from the store, widened on the device, equal to in-memory ones."""
    cfg = EncoderConfig(image="cnn", image_size=16)
    encs = {
        "image": build_encoder("image", cfg, 8),
        "text": _encoders("bert-tokens", tiny_clip_dir, tiny_bert_dir)["text"],
    }
    sets, stored = build_features(encs, {"x": stories}, cache=FeatureCache(tmp_path / "s"), dtype="float16")
    _, memory = build_features(encs, {"x": stories}, dtype="float16")
    plans = plan_batches(sets["x"], 16, np.random.default_rng(0), ("image", "text"), shuffle_stories=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(stories))
    for k, plan in enumerate(plans[:3]):
        a = gather(plan, stored).to("cpu")
        b = make_batch(sets["x"], [int(i) for i in order[16 * k : 16 * k + 16]], rng, memory).to("cpu")
        assert a.ids == b.ids and all(torch.equal(a.index[m], b.index[m]) for m in a.index)
        assert a.feats["text"].dtype == torch.float32 and a.feats["image"].dtype == torch.uint8  # widened
        assert all(torch.equal(a.feats[m], b.feats[m]) for m in a.feats)


def test_a_data_parallel_process_reads_only_its_share(stories, tmp_path):
    """Process r of W reads the rows of stories r, r+W, ... of each global batch, and nothing else."""
    enc = build_encoder("image", EncoderConfig(image="cnn", image_size=16), 8)
    sets, feats = build_features({"image": enc}, {"x": stories}, cache=FeatureCache(tmp_path / "s"))
    asked: list[np.ndarray] = []

    class Recording(StoredFeatures):
        def __getitem__(self, rows):
            asked.append(np.asarray(rows))
            return super().__getitem__(rows)

    view = feats["image"]
    rec = {"image": Recording(view.sources, view.src, view.row)}
    [plan] = plan_batches(sets["x"], 8, np.random.default_rng(3), ("image",), shuffle_stories=True)[:1]
    whole = gather(plan, feats)
    for rank in range(3):
        keep = list(range(rank, 8, 3))
        mine = gather(plan.select(keep), rec)
        want = np.concatenate([sets["x"].image_rows[plan.ids[k]] for k in keep])
        assert sorted(asked[-1].tolist()) == sorted(want.tolist())  # its stories' rows, no other
        assert torch.equal(mine.feats["image"], whole.rows(keep).feats["image"])
        assert torch.equal(mine.pos["image"], whole.rows(keep).pos["image"])


def _flip_data(p: Path) -> None:  # header intact, tensor bytes changed: only the checksum can tell
    b = bytearray(p.read_bytes())
    for k in range(len(b) - 64, len(b)):
        b[k] ^= 0xFF
    p.write_bytes(bytes(b))


def test_a_corrupt_shard_is_rebuilt_and_only_its_rows_recomputed(stories, tiny_clip_dir, tiny_bert_dir, tmp_path):
    enc = _encoders("bert-tokens", tiny_clip_dir, tiny_bert_dir)["text"]
    items = [it.sentence for s in stories for it in s.items]
    FeatureCache(tmp_path / "s", shard_size=256).ensure(enc, items, dtype="float16")
    shards = sorted((tmp_path / "s").rglob("*.safetensors"))
    assert len(shards) == 4
    rows = read_shard(shards[1])[0].shape[0]  # 256, or 232 for the last chunk
    _flip_data(shards[1])
    calls: list[int] = []
    orig = enc.featurize
    enc.featurize = lambda its, **kw: calls.append(len(its)) or orig(its, **kw)
    fresh = FeatureCache(tmp_path / "s", shard_size=256)
    with pytest.warns(CacheWarning, match="corrupt"):
        view = fresh.ensure(enc, items, dtype="float16")
    assert calls == [rows] and fresh.stats["rebuilt"] == 1  # that shard's rows, nothing else
    enc.featurize = orig
    assert torch.equal(view.to_tensor(), compact(enc.featurize(items), "float16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # the rebuilt shard is sound
        FeatureCache(tmp_path / "s").ensure(enc, items, dtype="float16")


def test_float16_overflow_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="feature_dtype=bfloat16"):
        compact(torch.tensor([1.0, 1e6]), "float16")
    assert compact(torch.tensor([1.0, 1e6]), "bfloat16").dtype == torch.bfloat16
    assert compact(torch.tensor([3], dtype=torch.uint8), "float16").dtype == torch.uint8


def test_dtypes_live_in_separate_directories(stories, tiny_bert_dir, tmp_path):
    enc = build_encoder("text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_max_length=24), 8)
    items = [it.sentence for it in stories[0].items]
    c = FeatureCache(tmp_path / "s")
    a, b = c.ensure(enc, items, dtype="float16"), c.ensure(enc, items, dtype="float32")
    assert a.dtype == torch.float16 and b.dtype == torch.float32 and c.stats["misses"] == 2 * len(items)
    assert torch.equal(a.to_tensor(), b.to_tensor().half())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8])
def test_memory_blocks_and_token_padding(dtype):
    """Rows held in memory (an unwritable store) read like stored ones; token features pad to the longest."""
    a = (torch.arange(2 * 3 * 2) % 200).reshape(2, 3, 2).to(dtype)
    b = (torch.arange(3 * 5 * 2) % 200).reshape(3, 5, 2).to(dtype)
    view = StoredFeatures.concat(
        [StoredFeatures([a], np.zeros(2), np.arange(2)), StoredFeatures([b], np.zeros(3), np.arange(3))]
    )
    assert view.shape == (5, 5, 2) and view.dtype == dtype
    want = torch.cat([torch.nn.functional.pad(a.float(), (0, 0, 0, 2)), b.float()]).to(dtype)
    assert torch.equal(view.to_tensor(), want)
    assert torch.equal(view[[4, 0, 4]], want[[4, 0, 4]]) and torch.equal(view.take(np.array([1, 3]))[:], want[[1, 3]])
