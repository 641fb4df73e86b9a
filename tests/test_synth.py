"""The synthetic-data generator: layout, cues, determinism and the Bayes ceilings."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from iterwego.data import readers as data_mod
from iterwego.data.synth import (
    CLOUD_RGB,
    COLOURS,
    FAMILIES,
    HOUR_WORDS,
    KINDS,
    ORDINAL_WORDS,
    SPLITS,
    SUN_RGB,
    SUN_RIM_RGB,
    SynthConfig,
    _render,
    _render_sky,
    load_ceilings,
    story_ceiling,
    sun_centre,
    synthesize,
)
from iterwego.errors import DataError

# Ceilings are probabilities from small combinatorial counts, in float64 (brute force in exact Fractions): the
# pytest.approx (rel 1e-6) and abs=1e-12 comparisons below bound a handful of float64 operations on O(1) values
# (~1e-16 each) or a float64 mean over <= a few hundred stories (~1e-14), the same on every CPU.

REQUIRED_KEYS = {
    "story_id", "photo_flickr_id", "worker_arranged_photo_order", "text", "original_text",
    "album_id", "storylet_id", "setting",
}  # fmt: skip
SIZE = 32  # the smallest size: if the cues read out here, they read out everywhere


def _generated(out: Path, cfg: SynthConfig):
    """(out, cfg, summary, synth_meta, split files) of a freshly synthesised dataset."""
    summary = synthesize(out, cfg)
    meta = json.loads((out / "synth_meta.json").read_text())
    files = {s: json.loads((out / f"{s}.story-in-sequence.json").read_text()) for s in SPLITS}
    return out, cfg, summary, meta, files


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _generated(tmp_path_factory.mktemp("synth") / "data", SynthConfig(stories=160, seed=3, image_size=SIZE))


def _annotations(files):
    for split, f in files.items():
        for ann in f["annotations"]:
            yield split, ann


def _gold_stories(files):
    """story id -> (split, annotations in gold order), built from the JSON alone."""
    by_story = defaultdict(list)
    split_of = {}
    for split, ann in _annotations(files):
        a = ann[0]
        by_story[a["story_id"]].append(a)
        split_of[a["story_id"]] = split
    return {
        sid: (split_of[sid], sorted(anns, key=lambda a: a["worker_arranged_photo_order"]))
        for sid, anns in by_story.items()
    }


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _pixels(out: Path, split: str, pid: str) -> np.ndarray:
    with Image.open(out / "images" / split / f"{pid}.png") as im:
        assert im.mode == "RGB"
        return np.asarray(im, dtype=np.int16)


def _water_rows(px: np.ndarray) -> int:
    """Rows of the left part (where the tank is) holding water-blue pixels."""
    left = px[:, : int(0.45 * px.shape[1])]
    r, b = left[..., 0], left[..., 2]
    water = (b > 170) & (r < 80) & (b - r > 100)
    return int(water.any(axis=1).sum())


def _is_cloth(px: np.ndarray) -> bool:
    s = px.shape[0]
    patch = px[int(0.3 * s) : int(0.7 * s), int(0.15 * s) : int(0.35 * s)]
    return bool((np.abs(patch - 140) <= 8).all())


# ---------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    cfg = dict(stories=12, image_size=SIZE)
    synthesize(tmp_path / "a", SynthConfig(seed=5, **cfg))
    synthesize(tmp_path / "b", SynthConfig(seed=5, **cfg))
    synthesize(tmp_path / "c", SynthConfig(seed=6, **cfg))
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


def test_story_content_does_not_depend_on_image_size_or_story_count(tmp_path):
    synthesize(tmp_path / "small", SynthConfig(stories=10, seed=1, image_size=32))
    synthesize(tmp_path / "big", SynthConfig(stories=10, seed=1, image_size=48))
    synthesize(tmp_path / "more", SynthConfig(stories=20, seed=1, image_size=32))
    for s in SPLITS:
        name = f"{s}.story-in-sequence.json"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()
    a = json.loads((tmp_path / "small" / "synth_meta.json").read_text())["stories"]
    b = json.loads((tmp_path / "more" / "synth_meta.json").read_text())["stories"]
    for sid in a:
        assert {k: v for k, v in a[sid].items() if k != "split"} == {k: v for k, v in b[sid].items() if k != "split"}
    with Image.open(next((tmp_path / "big" / "images").rglob("*.png"))) as im:
        assert im.size == (48, 48)


# -------------------------------------------------------------- layout/schema
def test_layout_and_schema(ds):
    out, cfg, summary, meta, files = ds
    assert (out / "ceilings.json").is_file() and (out / "synth_meta.json").is_file()
    assert summary["stories"] == {"train": 112, "val": 24, "test": 24}
    for s in SPLITS:
        f = files[s]
        assert set(f) >= {"images", "albums", "annotations", "info", "type"}
        assert f["albums"] == []
        assert len(f["images"]) == len(f["annotations"]) == summary["items"][s]
    photo_ids = []
    for split, ann in _annotations(files):
        assert isinstance(ann, list) and len(ann) == 1
        a = ann[0]
        assert set(a) >= REQUIRED_KEYS
        assert isinstance(a["story_id"], str) and isinstance(a["photo_flickr_id"], str)
        assert a["setting"] == ""
        assert (out / "images" / split / f"{a['photo_flickr_id']}.png").is_file()
        photo_ids.append(a["photo_flickr_id"])
    assert len(photo_ids) == len(set(photo_ids)), "photo ids must be unique over the dataset"
    assert sum(1 for _ in (out / "images").rglob("*.png")) == len(photo_ids)


def test_positions_lengths_and_shuffled_file_order(ds):
    out, cfg, summary, meta, files = ds
    lo, hi = cfg.lengths
    lengths = set()
    shuffled = 0
    for split, f in files.items():
        order_in_file = defaultdict(list)
        for ann in f["annotations"]:
            order_in_file[ann[0]["story_id"]].append(ann[0]["worker_arranged_photo_order"])
        for sid, positions in order_in_file.items():
            assert sorted(positions) == list(range(len(positions)))
            assert lo <= len(positions) <= hi
            assert meta["stories"][sid]["split"] == split
            lengths.add(len(positions))
            shuffled += positions != sorted(positions)
    assert len(lengths) > 1
    assert shuffled > len(meta["stories"]) // 2, "the file order must not follow the gold order"


def test_meta_matches_annotations(ds):
    out, cfg, summary, meta, files = ds
    gold = _gold_stories(files)
    assert set(gold) == set(meta["stories"])
    assert meta["config"]["seed"] == 3 and meta["config"]["time_steps"] == cfg.time_steps
    for sid, (split, anns) in gold.items():
        m = meta["stories"][sid]
        assert [a["photo_flickr_id"] for a in anns] == m["photo_ids"]
        t = m["times"]
        assert t == sorted(t) and len(set(t)) == len(t) and 0 <= t[0] and t[-1] < cfg.time_steps
        assert len(m["image_visible"]) == len(m["text_visible"]) == len(m["kinds"]) == len(m["colours"]) == len(t)


# ------------------------------------------------------------------------ cues
def test_text_cue(ds):
    out, cfg, summary, meta, files = ds
    number_words = set(HOUR_WORDS)
    for sid, (split, anns) in _gold_stories(files).items():
        m = meta["stories"][sid]
        for k, a in enumerate(anns):
            tokens = a["text"].split()
            if m["text_visible"][k]:
                i = tokens.index("hour")
                assert tokens[i + 1] == HOUR_WORDS[m["times"][k]]
                assert f"at hour {HOUR_WORDS[m['times'][k]]}" in a["original_text"].lower()
            else:
                assert "hour" not in tokens and not number_words & set(tokens)
            assert a["text"] == a["text"].lower()
            assert a["text"] == re.sub(r"\s*([.,])", r" \1", a["original_text"].lower())
            assert a["original_text"][0].isupper() and a["original_text"].endswith(".")


def test_image_cue_water_level_rises_with_time_and_hidden_shows_cloth(ds):
    out, cfg, summary, meta, files = ds
    levels = defaultdict(set)
    n_hidden = 0
    for sid, m in meta["stories"].items():
        for k, pid in enumerate(m["photo_ids"]):
            px = _pixels(out, m["split"], pid)
            assert px.shape == (SIZE, SIZE, 3)
            if m["image_visible"][k]:
                assert not _is_cloth(px)
                levels[m["times"][k]].add(_water_rows(px))
            else:
                n_hidden += 1
                assert _is_cloth(px)
                assert _water_rows(px) == 0
    assert n_hidden > 0
    assert all(len(v) == 1 for v in levels.values()), "a time must map to one water level"
    ts = sorted(levels)
    assert len(ts) == cfg.time_steps
    measured = [next(iter(levels[t])) for t in ts]
    assert all(a < b for a, b in zip(measured, measured[1:])), measured
    # proportional to (t+1)/T: a full tank at the last step, a twelfth of it at the first
    full = measured[-1]
    assert full >= 0.6 * SIZE
    assert all(abs(m - full * (t + 1) / cfg.time_steps) <= 1 for t, m in zip(ts, measured)), measured


def test_hidden_image_carries_no_time_and_visible_differs_only_in_tank():
    T = 12
    hidden = [np.asarray(_render(64, t, T, False, "star", "red", np.random.default_rng(9))) for t in range(T)]
    assert all((h == hidden[0]).all() for h in hidden)
    shown = [np.asarray(_render(64, t, T, True, "star", "red", np.random.default_rng(9))) for t in range(T)]
    diff = np.zeros((64, 64), bool)
    for s in shown[1:]:
        diff |= (s != shown[0]).any(axis=2)
    assert diff.any()
    cols = np.nonzero(diff.any(axis=0))[0]
    assert cols.max() < 0.45 * 64, "only the tank on the left may change with time"
    # Different hidden items share the cloth's look: only per-pixel noise differs inside it.
    a = np.asarray(_render(64, 0, T, False, "circle", "green", np.random.default_rng(1)), dtype=int)
    b = np.asarray(_render(64, 5, T, False, "cross", "black", np.random.default_rng(2)), dtype=int)
    assert np.abs(a[10:54, 8:26] - b[10:54, 8:26]).max() <= 12


def test_visibility_rates(ds):
    out, cfg, summary, meta, files = ds
    iv = np.concatenate([m["image_visible"] for m in meta["stories"].values()])
    tv = np.concatenate([m["text_visible"] for m in meta["stories"].values()])
    assert len(iv) > 500
    assert abs(iv.mean() - 0.7) < 0.06
    assert abs(tv.mean() - 0.7) < 0.06
    assert abs((~iv & ~tv).mean() - 0.09) < 0.04, "image and text cues must hide independently"


def test_hide_rates_are_configurable(tmp_path):
    synthesize(tmp_path / "d", SynthConfig(stories=20, seed=0, image_size=32, hide_image=0.0, hide_text=1.0))
    meta = json.loads((tmp_path / "d" / "synth_meta.json").read_text())["stories"]
    assert all(all(m["image_visible"]) and not any(m["text_visible"]) for m in meta.values())
    ceil = load_ceilings(tmp_path / "d")
    assert ceil["train"]["image_pmr"] == 1.0 and ceil["train"]["fused_pmr"] == 1.0
    assert ceil["train"]["text_pmr"] == pytest.approx(ceil["train"]["chance_pmr"])


# -------------------------------------------------------------------- identity
def test_identity_distinct_and_mentioned(ds):
    out, cfg, summary, meta, files = ds
    kinds, colours = set(), set()
    for sid, (split, anns) in _gold_stories(files).items():
        m = meta["stories"][sid]
        pairs = list(zip(m["kinds"], m["colours"]))
        assert len(set(pairs)) == len(pairs)
        for (kind, colour), a in zip(pairs, anns):
            tokens = a["text"].split()
            assert kind in tokens and colour in tokens
            assert tokens.index(colour) + 1 == tokens.index(kind)
        kinds.update(m["kinds"])
        colours.update(m["colours"])
    assert len(KINDS) >= 5 and len(COLOURS) >= 6
    assert kinds == set(KINDS) and colours == set(COLOURS)


# -------------------------------------------------------------------- ceilings
def brute_force_ceiling(times, visible, T, p_show=Fraction(7, 10)):
    """Exact Bayes-optimal PMR by enumerating the generative process; no gap formula.

    Worlds: every n-subset of times and every visibility pattern, weighted by
    its probability; keep those whose visible times equal the observed ones;
    hidden items are labelled and presented in every order equally likely. The
    best prediction is the most probable resulting order of labels.
    """
    n = len(times)
    obs = sorted(t for t, s in zip(times, visible) if s)
    h = n - len(obs)
    weight = Counter()
    for S in itertools.combinations(range(T), n):
        for pattern in itertools.product([True, False], repeat=n):
            if sorted(t for t, s in zip(S, pattern) if s) != obs:
                continue
            w = p_show ** sum(pattern) * (1 - p_show) ** (n - sum(pattern))
            hidden_times = [t for t, s in zip(S, pattern) if not s]
            for labels in itertools.permutations(range(h)):
                order = sorted([(t, ("v", t)) for t in obs] + [(t, ("h", lab)) for t, lab in zip(hidden_times, labels)])
                weight[tuple(lab for _, lab in order)] += w
    total = sum(weight.values())
    return max(weight.values()) / total


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_story_ceiling_matches_brute_force(data):
    T = data.draw(st.integers(1, 7))
    n = data.draw(st.integers(1, min(T, 4)))
    times = sorted(data.draw(st.permutations(range(T)))[:n])
    visible = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    assert story_ceiling(times, visible, T) == pytest.approx(float(brute_force_ceiling(times, visible, T)), abs=1e-12)


def test_story_ceiling_hand_cases():
    assert story_ceiling([0, 3, 5, 9], [True] * 4, 12) == 1.0
    assert story_ceiling([0, 1, 2, 3], [True, False, True, True], 4) == 1.0  # T = n: no free time to guess
    # visible at 1, hidden at 3, T=4: free times {0} | {2, 3}; betting on "after" wins 2 of 3.
    assert story_ceiling([1, 3], [True, False], 4) == pytest.approx(2 / 3)
    # visible at 2, one hidden, T=5: gaps {0,1} and {3,4} tie at 1/2.
    assert story_ceiling([2, 4], [True, False], 5) == pytest.approx(1 / 2)
    # nothing visible: chance, 1/n!.
    assert story_ceiling([0, 4, 7], [False] * 3, 12) == pytest.approx(1 / 6)
    # visible at 1, two hidden, T=6: free {0} | {2,3,4,5}; both after: C(4,2)/C(5,2)/2! = 6/10/2.
    assert story_ceiling([1, 2, 5], [True, False, False], 6) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        story_ceiling([1, 1], [True, False], 4)
    with pytest.raises(ValueError):
        story_ceiling([1, 4], [True, False], 4)


def test_ceilings_file(ds):
    out, cfg, summary, meta, files = ds
    ceil = load_ceilings(out)
    assert set(ceil) >= set(SPLITS)
    assert summary["ceilings"] == ceil["test"]
    per_split = defaultdict(lambda: defaultdict(list))
    for m in meta["stories"].values():
        iv, tv = np.array(m["image_visible"]), np.array(m["text_visible"])
        c_img = story_ceiling(m["times"], iv, cfg.time_steps)
        c_txt = story_ceiling(m["times"], tv, cfg.time_steps)
        c_fus = story_ceiling(m["times"], iv | tv, cfg.time_steps)
        assert c_fus >= max(c_img, c_txt) - 1e-12
        for key, c in (("image_pmr", c_img), ("text_pmr", c_txt), ("fused_pmr", c_fus)):
            per_split[m["split"]][key].append(c)
    for s in SPLITS:
        c = ceil[s]
        assert c["stories"] == summary["stories"][s] and c["items"] == summary["items"][s]
        for key in ("image_pmr", "text_pmr", "fused_pmr"):
            assert c[key] == pytest.approx(np.mean(per_split[s][key]))
        assert c["chance_pmr"] < min(c["image_pmr"], c["text_pmr"]) <= c["fused_pmr"] <= 1.0


def test_load_ceilings_absent_and_malformed(tmp_path):
    assert load_ceilings(tmp_path) is None
    (tmp_path / "ceilings.json").write_text("{not json")
    with pytest.raises(DataError, match="ceilings.json"):
        load_ceilings(tmp_path)
    (tmp_path / "ceilings.json").write_text('{"train": {}}')
    with pytest.raises(DataError, match="ceilings.json"):
        load_ceilings(tmp_path)


# ------------------------------------------------------------ output directory
def test_refuses_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        synthesize(tmp_path, SynthConfig(stories=3, image_size=32))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError):
        synthesize(f, SynthConfig(stories=3, image_size=32))


def test_overwrites_previous_output_without_stale_images(tmp_path):
    synthesize(tmp_path / "o", SynthConfig(stories=30, seed=0, image_size=32))
    summary = synthesize(tmp_path / "o", SynthConfig(stories=6, seed=2, image_size=32))
    synthesize(tmp_path / "fresh", SynthConfig(stories=6, seed=2, image_size=32))
    assert _tree_hash(tmp_path / "o") == _tree_hash(tmp_path / "fresh")
    assert sum(1 for _ in (tmp_path / "o" / "images").rglob("*.png")) == sum(summary["items"].values())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lengths=(3, 8), time_steps=7),  # T < HI
        dict(lengths=(3, 21), time_steps=21),  # no number word past twenty
        dict(image_size=16),
        dict(image_size=300),
        dict(lengths=(4, 3)),
        dict(lengths=(0, 3)),
        dict(stories=0),
        dict(hide_image=1.5),
        dict(train_frac=0.8),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)


def test_config_accepts_lengths_from_json():
    assert SynthConfig(lengths=[2, 5], time_steps=5).lengths == (2, 5)


def test_cli_synth(tmp_path, capsys):
    from iterwego.apps.cli import main

    assert (
        main(["synth", str(tmp_path / "cli"), "--stories", "5", "--image-size", "32", "--lengths", "2-4", "--quiet"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["stories"] == {"train": 3, "val": 1, "test": 1}
    assert set(summary["ceilings"]) >= {"image_pmr", "text_pmr", "fused_pmr"}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["synth", str(tmp_path / "busy"), "--stories", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "busy" in err and err.count("\n") == 1


def test_load_split_reads_gold_order(ds):
    out, cfg, summary, meta, files = ds
    gold = _gold_stories(files)
    for s in SPLITS:
        stories = data_mod.load_split(out, s)
        assert len(stories) == summary["stories"][s]
        for story in stories:
            m = meta["stories"][story.id]
            assert [Path(it.image).stem for it in story.items] == m["photo_ids"]
            assert all(Path(it.image).is_file() for it in story.items)
            assert story.sentences == [a["text"] for a in gold[story.id][1]]


# ------------------------------------------------------------------ sky family
# The second family must keep the first one's promises (determinism, one cue per modality that reveals the exact
# time or nothing, exact ceilings) with other looks and rates, or recipe choices made on both families mean little.
SKY_T = FAMILIES["sky"]["time_steps"]


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    cfg = SynthConfig.for_family("sky", stories=200, seed=4, image_size=SIZE)
    return _generated(tmp_path_factory.mktemp("sky") / "data", cfg)


def _sky_rows(size: int) -> int:
    """Rows above the grass; the identity stands below them and may be orange, close to the sun's rim."""
    return round(0.66 * size)


def _sun_mask(px: np.ndarray) -> np.ndarray:
    sky = px[: _sky_rows(px.shape[0])]
    near = [(np.abs(sky - np.asarray(c)) <= 8).all(axis=2) for c in (SUN_RGB, SUN_RIM_RGB)]
    return near[0] | near[1]


def _is_cloud_bank(px: np.ndarray) -> bool:
    s = px.shape[0]
    return bool((np.abs(px[int(0.1 * s) : int(0.6 * s)] - np.asarray(CLOUD_RGB)) <= 6).all())


def test_sky_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(tmp_path / name, SynthConfig.for_family("sky", stories=8, seed=seed, image_size=SIZE))
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


def test_sky_meta_records_the_family_and_its_defaults(sky):
    out, cfg, summary, meta, files = sky
    c = meta["config"]
    assert (c["family"], c["hide_image"], c["hide_text"], c["time_steps"]) == ("sky", 0.2, 0.45, 16)
    assert summary["time_steps"] == SKY_T == 16
    assert SynthConfig(**c) == cfg, "synth_meta's config must rebuild the run's config"
    lengths = Counter(len(m["times"]) for m in meta["stories"].values())
    assert set(lengths) == set(range(cfg.lengths[0], cfg.lengths[1] + 1))
    assert all(0 <= t < SKY_T for m in meta["stories"].values() for t in m["times"])


def test_sky_text_cue_is_an_ordinal_bell(sky):
    out, cfg, summary, meta, files = sky
    ordinals = set(ORDINAL_WORDS)
    for sid, (split, anns) in _gold_stories(files).items():
        m = meta["stories"][sid]
        for k, a in enumerate(anns):
            tokens = a["text"].split()
            assert "hour" not in tokens, "the tank's cue must not leak into the sky family"
            assert m["kinds"][k] in tokens and m["colours"][k] in tokens
            if m["text_visible"][k]:
                phrase = f"after the {ORDINAL_WORDS[m['times'][k]]} bell"
                assert phrase in a["original_text"].lower() and phrase in a["text"]
                assert tokens.count("bell") == 1
            else:
                assert "bell" not in tokens and not ordinals & set(tokens)
            assert a["text"] == re.sub(r"\s*([.,])", r" \1", a["original_text"].lower())
            assert a["original_text"][0].isupper() and a["original_text"].endswith(".")


def test_sky_image_cue_sun_moves_left_to_right_and_hidden_shows_cloud_bank(sky):
    out, cfg, summary, meta, files = sky
    centres = defaultdict(set)
    n_hidden = 0
    for m in meta["stories"].values():
        for k, pid in enumerate(m["photo_ids"]):
            px = _pixels(out, m["split"], pid)
            sun = _sun_mask(px)
            if m["image_visible"][k]:
                assert not _is_cloud_bank(px)
                ys, xs = np.nonzero(sun)
                assert len(xs) >= 20, "the sun must be drawn whole, not clipped, even at 32 px"
                centres[m["times"][k]].add((xs.mean() + 0.5, ys.mean() + 0.5))
            else:
                n_hidden += 1
                assert _is_cloud_bank(px)
                assert not sun.any()
    assert n_hidden > 0
    assert all(len(v) == 1 for v in centres.values()), "a time must map to one sun position"
    ts = sorted(centres)
    assert ts == list(range(SKY_T))
    measured = [next(iter(centres[t])) for t in ts]
    xs = [x for x, _ in measured]
    assert all(a < b for a, b in zip(xs, xs[1:])), xs
    for t, (x, y) in zip(ts, measured):
        ex, ey = sun_centre(SIZE, t, SKY_T)
        assert abs(x - ex) <= 1 and abs(y - ey) <= 1, (t, x, y, ex, ey)
    ys = [y for _, y in measured]
    assert min(ys) < ys[0] - 0.25 * SIZE and min(ys) < ys[-1] - 0.25 * SIZE, "an arc: rises, then sets"


def test_sky_hidden_image_carries_no_time_and_visible_differs_only_near_the_sun():
    size = 64
    hidden = [
        np.asarray(_render_sky(size, t, SKY_T, False, "star", "red", np.random.default_rng(9))) for t in range(SKY_T)
    ]
    assert all((h == hidden[0]).all() for h in hidden)
    r = 0.085 * size + 1.5  # the sun's radius plus the outline's rounding
    yy, xx = np.mgrid[:size, :size] + 0.5
    for seed in range(4):  # different bird counts and places: a bird under the sun must not count as a change
        shown = [
            np.asarray(_render_sky(size, t, SKY_T, True, "circle", "orange", np.random.default_rng(seed)))
            for t in range(SKY_T)
        ]
        for t in range(1, SKY_T):
            diff = (shown[t] != shown[0]).any(axis=2)
            assert diff.any()
            near = np.zeros_like(diff)
            for tt in (0, t):
                cx, cy = sun_centre(size, tt, SKY_T)
                near |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
            assert not (diff & ~near).any(), f"seed {seed}, t {t}: pixels away from the sun depend on time"
    # Different hidden items share the cloud bank's look: only per-pixel noise differs inside it.
    a = np.asarray(_render_sky(size, 0, SKY_T, False, "circle", "green", np.random.default_rng(1)), dtype=int)
    b = np.asarray(_render_sky(size, 9, SKY_T, False, "cross", "black", np.random.default_rng(2)), dtype=int)
    assert np.abs(a[4:40] - b[4:40]).max() <= 10


def test_sky_visibility_rates(sky):
    out, cfg, summary, meta, files = sky
    iv = np.concatenate([m["image_visible"] for m in meta["stories"].values()])
    tv = np.concatenate([m["text_visible"] for m in meta["stories"].values()])
    assert len(iv) > 900
    assert abs(iv.mean() - 0.8) < 0.05
    assert abs(tv.mean() - 0.55) < 0.06
    assert abs((~iv & ~tv).mean() - 0.2 * 0.45) < 0.04, "image and text cues must hide independently"


def test_sky_ceilings_file(sky):
    out, cfg, summary, meta, files = sky
    ceil = load_ceilings(out)
    assert summary["ceilings"] == ceil["test"]
    per_split = defaultdict(lambda: defaultdict(list))
    for m in meta["stories"].values():
        iv, tv = np.array(m["image_visible"]), np.array(m["text_visible"])
        for key, vis in (("image_pmr", iv), ("text_pmr", tv), ("fused_pmr", iv | tv)):
            per_split[m["split"]][key].append(story_ceiling(m["times"], vis, SKY_T))
    for s in SPLITS:
        c = ceil[s]
        assert c["stories"] == summary["stories"][s] and c["items"] == summary["items"][s]
        for key in ("image_pmr", "text_pmr", "fused_pmr"):
            assert c[key] == pytest.approx(np.mean(per_split[s][key]))
        # images hide less often than sentences here, so they are the stronger modality
        assert c["chance_pmr"] < c["text_pmr"] < c["image_pmr"] <= c["fused_pmr"] <= 1.0


def test_for_family_defaults_overrides_and_unknown_names():
    assert SynthConfig.for_family("tank") == SynthConfig(), "the tank family's defaults are the dataclass defaults"
    sky_cfg = SynthConfig.for_family("sky", stories=7, hide_text=None, time_steps=None)
    assert (sky_cfg.family, sky_cfg.stories) == ("sky", 7)
    assert (sky_cfg.hide_image, sky_cfg.hide_text, sky_cfg.time_steps) == (0.2, 0.45, 16)
    mine = SynthConfig.for_family("sky", hide_image=0.0, hide_text=1.0, time_steps=10)
    assert (mine.hide_image, mine.hide_text, mine.time_steps) == (0.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"'nope'.*tank, sky"):
        SynthConfig.for_family("nope")
    with pytest.raises(ValueError, match=r"'nope'.*tank, sky"):
        SynthConfig(family="nope")
    with pytest.raises(ValueError, match="time_steps"):
        SynthConfig.for_family("sky", time_steps=7)  # fewer steps than the longest story
    plain = SynthConfig(family="sky", hide_image=0.5)  # unset fields take the family's value, set ones win
    assert (plain.hide_image, plain.hide_text, plain.time_steps) == (0.5, 0.45, 16)


def test_cli_synth_bad_option_is_one_line(tmp_path, capsys):
    from iterwego.apps.cli import main

    rc = main(["synth", str(tmp_path / "x"), "--family", "sky", "--time-steps", "7", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "time_steps" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_synth_sky_family(tmp_path, capsys):
    from iterwego.apps import commands
    from iterwego.apps.cli import build_parser, main
    from iterwego.data import synth

    assert commands.SYNTH_FAMILIES == tuple(synth.FAMILIES), "the CLI's choices must list every family"
    assert (
        main(["synth", str(tmp_path / "sky"), "--family", "sky", "--stories", "20", "--image-size", "32", "--quiet"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["time_steps"] == 16 and sum(summary["stories"].values()) == 20
    meta = json.loads((tmp_path / "sky" / "synth_meta.json").read_text())
    assert (meta["config"]["family"], meta["config"]["hide_image"], meta["config"]["hide_text"]) == ("sky", 0.2, 0.45)
    texts = [
        a[0]["text"] for a in json.loads((tmp_path / "sky" / "train.story-in-sequence.json").read_text())["annotations"]
    ]
    assert any(" bell" in t for t in texts) and not any("hour" in t for t in texts)
    args = [
        "--stories",
        "5",
        "--image-size",
        "32",
        "--quiet",
        "--hide-image",
        "0",
        "--hide-text",
        "1",
        "--time-steps",
        "9",
    ]
    assert main(["synth", str(tmp_path / "own"), "--family", "sky", *args]) == 0
    capsys.readouterr()
    c = json.loads((tmp_path / "own" / "synth_meta.json").read_text())["config"]
    assert (c["family"], c["hide_image"], c["hide_text"], c["time_steps"]) == ("sky", 0.0, 1.0, 9)
    assert main(["synth", str(tmp_path / "tank"), "--stories", "3", "--image-size", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "tank" / "synth_meta.json").read_text())["config"]["family"] == "tank"
    assert build_parser().parse_args(["demo", "--family", "sky"]).family == "sky"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", str(tmp_path / "x"), "--family", "nope"])


@pytest.mark.benchmark
def test_default_dataset_generates_fast(tmp_path):
    summary = synthesize(tmp_path / "default", SynthConfig())
    assert sum(summary["stories"].values()) == 600
    assert summary["seconds"] < 20


# --------------------------------------------------------------------------- narrating sentences (weak alignment)
@pytest.mark.parametrize("family", ["tank", "sky"])
def test_narrating_sentences_name_nothing_pictured_and_keep_everything_else(tmp_path, family):
    """synth --narrate P: about P of the sentences name no object and no colour; the time phrase stays where the
    item shows it, and every other sentence, every image and every hidden time are those of narrate=0."""
    from iterwego.data.readers import load_split
    from iterwego.data.synth import COLOURS, KINDS

    base, weak = tmp_path / "base", tmp_path / "weak"
    synthesize(base, SynthConfig.for_family(family, stories=60, seed=3))
    synthesize(weak, SynthConfig.for_family(family, stories=60, seed=3, narrate=0.5))
    meta_b = json.loads((base / "synth_meta.json").read_text())["stories"]
    meta_w = json.loads((weak / "synth_meta.json").read_text())["stories"]
    assert all("narrating" not in v for v in meta_b.values())  # narrate=0 writes what it always wrote
    narrating = {sid: v.pop("narrating") for sid, v in meta_w.items()}
    assert meta_w == meta_b  # times, visibility, identities, photo ids: unchanged
    assert 0.4 < np.mean([x for v in narrating.values() for x in v]) < 0.6
    pictured, cue = set(KINDS) | set(COLOURS), "hour" if family == "tank" else "bell"
    for split in ("train", "val", "test"):
        for sb, sw in zip(load_split(base, split), load_split(weak, split)):
            for j, (ib, iw) in enumerate(zip(sb.items, sw.items)):
                assert Path(ib.image).read_bytes() == Path(iw.image).read_bytes()
                words = set(iw.sentence.replace(".", " ").replace(",", " ").split())
                if not narrating[sw.id][j]:
                    assert iw.sentence == ib.sentence
                    continue
                assert not words & pictured, iw.sentence  # nothing pictured
                assert (cue in words) == meta_b[sw.id]["text_visible"][j], iw.sentence  # the time cue stays


def test_narrate_out_of_range_is_one_line(capsys):
    from iterwego.apps.cli import main

    assert main(["demo", "--out", "/nonexistent/never-made", "--narrate", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "narrate must be in [0, 1], got 1.5" in err[0]
    with pytest.raises(ValueError, match="narrate"):
        SynthConfig(narrate=-0.1)


def test_one_split_alone_is_byte_for_byte_that_split_of_the_whole_dataset(tmp_path):
    """synthesize(splits=("test",)): the demo's narrating test split without rendering the rest again."""
    whole, alone = tmp_path / "whole", tmp_path / "alone"
    cfg = SynthConfig.for_family("tank", stories=40, seed=5, narrate=0.5)
    synthesize(whole, cfg)
    summary = synthesize(alone, cfg, splits=("test",))
    assert summary["stories"] == {"test": cfg.split_sizes()["test"]}
    assert not (alone / "train.story-in-sequence.json").exists() and not any((alone / "images").glob("train/*"))
    name = "test.story-in-sequence.json"
    assert (alone / name).read_bytes() == (whole / name).read_bytes()
    pngs = sorted(p.name for p in (whole / "images" / "test").iterdir())
    assert pngs == sorted(p.name for p in (alone / "images" / "test").iterdir()) and pngs
    assert all(
        (alone / "images" / "test" / n).read_bytes() == (whole / "images" / "test" / n).read_bytes() for n in pngs
    )
    test_ceilings = json.loads((whole / "ceilings.json").read_text())["test"]
    assert json.loads((alone / "ceilings.json").read_text()) == {"test": test_ceilings}


def test_narrating_bounds_by_hand():
    """Exchangeable narrating items cap the bounds at 1/u!; never above the item-level fusion ceiling."""
    from iterwego.data.synth import narrating_bounds

    times, T = [0, 3, 5, 8], 10
    every = [True] * 4
    # nothing narrates: both bounds are the fusion ceiling (every time visible: 1)
    assert narrating_bounds(times, every, every, [False] * 4, T) == (1.0, 1.0)
    # two narrating sentences hide their time: they are exchangeable (1/2); the images all show theirs (1)
    text = [True, False, False, True]
    assert narrating_bounds(times, every, text, [False, True, True, False], T) == (1.0, 0.5)
    # three images hide their time and their sentences narrate: 1/3! for the images, and never above fusion
    img = [True, False, False, False]
    fused = story_ceiling(times, [a or b for a, b in zip(img, text)], T)
    got = narrating_bounds(times, img, text, [False, True, True, True], T)
    assert got == (min(fused, 1 / 6), min(fused, 1 / 2))


def test_ceilings_file_holds_the_narrating_bounds_only_when_sentences_narrate(tmp_path):
    from iterwego.data.readers import pmr_ceilings
    from iterwego.data.synth import ceilings_from_meta

    plain, weak = tmp_path / "plain", tmp_path / "weak"
    synthesize(plain, SynthConfig.for_family("sky", stories=60, seed=2))
    synthesize(weak, SynthConfig.for_family("sky", stories=60, seed=2, narrate=0.5))
    c0, c5 = (json.loads((d / "ceilings.json").read_text()) for d in (plain, weak))
    assert "fused_text_bound_pmr" not in c0["test"] and set(pmr_ceilings(plain, "test")) == {"image", "text", "fused"}
    for split in ("train", "val", "test"):
        assert {k: c5[split][k] for k in c0[split]} == c0[split]  # the other ceilings do not change
        assert c5[split]["fused_text_bound_pmr"] <= c5[split]["fused_pmr"]
        assert c5[split]["fused_image_bound_pmr"] <= c5[split]["fused_pmr"]
    assert c5["train"]["fused_text_bound_pmr"] < c5["train"]["fused_pmr"]  # 40 stories: some pair of loose sentences
    assert ceilings_from_meta(weak) == c5
    got = pmr_ceilings(weak, "test")
    assert got["fused_text"] == c5["test"]["fused_text_bound_pmr"] and got["fused"] == c5["test"]["fused_pmr"]
