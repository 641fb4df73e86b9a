"""EXIF capture times: read, compared within one camera only, never contradicted by any decoder, never used unasked."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from iterwego.apps.cli import main
from iterwego.apps.order import order_stories, stories_from_args
from iterwego.capture_time import (
    CaptureTime,
    pin_logits,
    placed_by_time,
    precedence,
    read_capture_time,
    read_capture_times,
    times_in_effect,
)
from iterwego.data.cache import FeatureCache
from iterwego.data.features import build_features
from iterwego.data.readers import load_split
from iterwego.data.synth import CAMERAS, SPLITS, SynthConfig, synthesize
from iterwego.decode import decode, order_score
from iterwego.model import load_run
from iterwego.training.evaluator import Evaluator

TRAIN = [
    "--quiet",
    "--set", "train.unimodal_epochs=1",
    "--set", "train.iterative_epochs=1",
    "--set", "aligner.epochs=1",
    "--set", "fusion.epochs=1",
    "--set", "encoder.image_size=32",
    "--set", "train.num_threads=1",
]  # fmt: skip


def _photo(path: Path, when: str | None = None, *, model=None, subsec=None, offset=None, ifd0=False) -> str:
    exif = Image.Exif()
    if model is not None:
        exif[0x0110] = model
    sub = exif.get_ifd(0x8769)
    if when is not None:
        (exif if ifd0 else sub)[0x9003] = when
    if subsec is not None:
        sub[0x9291] = subsec
    if offset is not None:
        sub[0x9011] = offset
    Image.new("RGB", (24, 16), (200, 40, 40)).save(path, exif=exif)
    return str(path)


def _ct(hh: int, mm: int = 0, *, camera="A", offset_h: float | None = None) -> CaptureTime:
    off = None if offset_h is None else timedelta(hours=offset_h)
    return CaptureTime(datetime(2024, 5, 1, hh, mm), off, camera)


def _broken(order, times: list) -> list[tuple[int, int]]:
    """Pairs (i, j) of gold items with known same-camera times t_i < t_j that ``order`` puts j first."""
    pos = {item: k for k, item in enumerate(order)}
    return [
        (i, j)
        for i, j in itertools.permutations(range(len(times)), 2)
        if times[i] and times[j] and times[i][1] == times[j][1] and times[i][0] < times[j][0] and pos[i] > pos[j]
    ]


# ----------------------------------------------------------------------------- reading EXIF
def test_reads_datetime_original_with_subseconds_offset_and_camera(tmp_path):
    jpg = _photo(tmp_path / "a.jpg", "2024:05:01 09:15:30", model="Pixel 8 ", subsec="25", offset="+02:00")
    t = read_capture_time(jpg)
    assert t == CaptureTime(datetime(2024, 5, 1, 9, 15, 30, 250000), timedelta(hours=2), "Pixel 8")
    assert t.iso() == "2024-05-01T09:15:30.250000+02:00" and t.utc == datetime(2024, 5, 1, 7, 15, 30, 250000)
    png = _photo(tmp_path / "b.png", "2023:12:31 23:59:59", model="X100")  # PNG eXIf round-trips through Pillow
    assert read_capture_time(png) == CaptureTime(datetime(2023, 12, 31, 23, 59, 59), None, "X100")
    assert read_capture_time(_photo(tmp_path / "c.jpg", "2024:01:02 03:04:05", ifd0=True)).camera == ""
    assert read_capture_time(_photo(tmp_path / "d.jpg", offset="-05:00")) is None  # no DateTimeOriginal
    assert read_capture_time(_photo(tmp_path / "e.jpg", "0000:00:00 00:00:00")) is None  # clock never set
    assert read_capture_time(_photo(tmp_path / "f.jpg", "    :  :     :  :  ")) is None
    assert read_capture_time(_photo(tmp_path / "g.jpg", "2024:05:01 09:00:00", offset="bogus")).offset is None
    (tmp_path / "h.jpg").write_text("not a picture")
    assert read_capture_times([str(tmp_path / "h.jpg"), None, str(tmp_path / "missing.jpg")]) == [None] * 3


def test_only_distinct_times_of_one_camera_are_evidence():
    times = [_ct(9), _ct(18), _ct(12, camera="B"), _ct(9), None, _ct(10, offset_h=-7)]
    b = precedence(times)
    assert b[0, 1] and not b[1, 0]
    assert not b[:, 2].any() and not b[2].any()  # another camera: its clock may be off
    assert not b[0, 3] and not b[3, 0] and b[3, 1]  # equal times are no evidence
    assert not b[4].any() and not b[:, 4].any()  # no time
    assert b[0, 5] and b[5, 1]  # not every photo of camera A has an offset: its own clock decides
    assert placed_by_time(b).tolist() == [True, True, False, True, False, True]
    # when every photo of the camera has one, UTC decides: 09:30 at UTC+2 was before 08:00 at UTC
    assert precedence([_ct(8, offset_h=0), _ct(9, 30, offset_h=2)]).tolist() == [[False, False], [True, False]]
    # a mixed camera is still one consistent order, so the decoders always find one that obeys it
    mixed = [_ct(10, offset_h=0), _ct(9, offset_h=-2), _ct(9, 30)]
    assert decode(np.zeros((3, 3)), before=precedence(mixed)) == [1, 2, 0]
    assert times_in_effect("auto", [None, _ct(9), _ct(10)]) and not times_in_effect("auto", [None, _ct(9)])
    assert times_in_effect("on", []) and not times_in_effect("off", times)
    with pytest.raises(ValueError, match="auto, on, off"):
        times_in_effect("sometimes", times)


# ----------------------------------------------------------------------------- decoding under constraints
def test_every_decoder_obeys_the_times_and_exact_is_best_among_obeying_orders():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 15))
        p = rng.uniform(1e-4, 1 - 1e-4, (n, n))
        if trial % 3 == 0:  # confident predictions: the ones most tempted to override a time
            p = np.where(rng.random((n, n)) < 0.5, 1 - 1e-9, 1e-9)
        lp = np.log(p)
        t = rng.integers(0, 6, n)
        known = rng.random(n) < 0.6
        before = (t[:, None] < t[None, :]) & known[:, None] & known[None, :]
        for method in ("exact", "beam", "tsort") if n <= 12 else ("beam", "tsort"):
            pos = np.argsort(decode(lp, method, before=before))
            assert not (before & (pos[:, None] > pos[None, :])).any(), (trial, method)
        if n <= 5:
            obeying = [
                q
                for q in itertools.permutations(range(n))
                if not _broken(q, [(x, 0) if k else None for x, k in zip(t, known)])
            ]
            best = max(order_score(lp, q) for q in obeying)
            # float64 sums of <= 10 log-probabilities: ~1e-15 rounding on any CPU, far below 1e-9
            assert order_score(lp, decode(lp, "exact", before=before)) == pytest.approx(best, abs=1e-9)
    assert decode(np.log(np.full((3, 3), 0.5)), before=np.zeros((3, 3), bool)) == [0, 1, 2]
    with pytest.raises(ValueError, match="cycle"):
        decode(np.zeros((2, 2)), before=np.array([[False, True], [True, False]]))


def test_pinned_pairs_have_probability_one_and_zero():
    logits = torch.randn(1, 3, 3, 2) * 30
    before = np.zeros((1, 3, 3), bool)
    before[0, 2, 0] = True
    p = pin_logits(logits, before).softmax(-1)[..., 1]
    assert p[0, 2, 0].item() == 1.0 and p[0, 0, 2].item() == 0.0
    keep = ~(before | before.transpose(0, 2, 1))
    assert torch.equal(pin_logits(logits, before)[torch.from_numpy(keep)], logits[torch.from_numpy(keep)])


# ----------------------------------------------------------------------------- synthetic albums with times
def test_synth_writes_times_into_a_share_of_the_photos_without_changing_them(tmp_path):
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    synthesize(plain, SynthConfig(stories=12, seed=4, image_size=32))
    synthesize(timed, SynthConfig(stories=12, seed=4, image_size=32, exif_rate=0.5, clock_shift=-3))
    for split in SPLITS:
        assert (plain / f"{split}.story-in-sequence.json").read_text() == (
            timed / f"{split}.story-in-sequence.json"
        ).read_text()
    files = sorted((timed / "images").rglob("*.png"))
    for f in files:
        same = plain / f.relative_to(timed)
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(same)))
        assert read_capture_time(same) is None
    meta = json.loads((timed / "synth_meta.json").read_text())
    got = read_capture_times(files)
    assert 0.35 < sum(t is not None for t in got) / len(files) < 0.65
    day0, cams = datetime(2024, 1, 1, 8), set()
    for sid, st in meta["stories"].items():
        for k, (when, cam) in enumerate(zip(st["capture_times"], st["cameras"])):
            t = read_capture_time(timed / "images" / st["split"] / f"{st['photo_ids'][k]}.png")
            assert (t is None) == (when is None)
            if t is not None:
                shift = -3 if cam == CAMERAS[1] else 0
                assert t.camera == cam and t.local == day0 + timedelta(days=int(sid), hours=st["times"][k] + shift)
                cams.add(cam)
    assert cams == set(CAMERAS)
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "bad"), "--exif-rate", "1.5"])


# ----------------------------------------------------------------------------- a trained run on half-timed albums
@pytest.fixture(scope="module")
def album(tmp_path_factory) -> SimpleNamespace:
    """Half the photos carry a time, from two cameras whose clocks differ by 5 hours; trained with --capture-time on."""
    root = tmp_path_factory.mktemp("capture")
    timed, plain, run = root / "timed", root / "plain", root / "run"
    synthesize(timed, SynthConfig(stories=80, seed=11, image_size=32, exif_rate=0.5, clock_shift=5))
    synthesize(plain, SynthConfig(stories=80, seed=11, image_size=32))
    assert main(["train", "--data", str(timed), "--out", str(run), "--capture-time", "on", *TRAIN]) == 0
    meta = json.loads((timed / "synth_meta.json").read_text())["stories"]
    truth = {sid: [c and (c, cam) for c, cam in zip(st["capture_times"], st["cameras"])] for sid, st in meta.items()}
    return SimpleNamespace(timed=timed, plain=plain, run=run, truth=truth)


@pytest.fixture(scope="module")
def evaluated(album) -> SimpleNamespace:
    """Every story of every split, every guidance round and fused decoding, with and without capture times."""
    model, meta = load_run(album.run)
    stories = [s for sp in SPLITS for s in load_split(album.timed, sp)]
    sets, feats = build_features(model.encoders(), {"all": stories}, cache=FeatureCache(FeatureCache.default_root()))
    res = Evaluator(sets["all"], feats, capture_time=True)(model, keep_orders=True)
    return SimpleNamespace(res=res, meta=meta, stories=stories)


def test_no_pair_with_two_known_same_camera_times_is_ever_ordered_against_them(album, evaluated):
    res, stories = evaluated.res, evaluated.stories
    keys = [f"timed/image/round{r}" for r in range(len(res.timed["image"]))] + ["timed/fused/image"]
    assert len(keys) == 5  # rounds 0..3 (unimodal and guided) and fused decoding
    pairs = sum(len(_broken(list(range(len(s))), album.truth[s.id])) for s in stories)  # 0: gold obeys them
    evidence = sum(int(precedence(read_capture_times(s.images)).sum()) for s in stories)
    assert pairs == 0 and evidence > 100  # many fixed pairs over 80 stories, across two shifted cameras
    for key in keys:
        for s, order in zip(stories, res.orders[key]):
            assert _broken(order, album.truth[s.id]) == [], (key, s.id)
    untimed = sum(len(_broken(o, album.truth[s.id])) for s, o in zip(stories, res.orders["fused/image"]))
    assert untimed > 0  # without times the model does contradict some of them


def test_capture_times_raise_pmr_on_half_timed_albums(evaluated):
    res, r = evaluated.res, evaluated.meta["capture_time"]["chosen_rounds"]["image"]
    assert res.timed["fused"]["pmr"] > res.fused["pmr"]
    assert res.timed["image"][r]["pmr"] > res.rounds["image"][r]["pmr"]
    # sentences follow the fused order through the aligner's pairing, which times do not change: a story's
    # sentence order is its image order (in gold ids) exactly when the pairing is right, with times or without
    follows = [t == i for t, i in zip(res.orders["fused/text"], res.orders["fused/image"])]
    assert follows == [t == i for t, i in zip(res.orders["timed/fused/text"], res.orders["timed/fused/image"])]
    assert 0 < sum(follows) < len(follows)  # both cases occur here (an aligner trained for one epoch)
    assert 0.3 < res.timed["placed_by_time"] < 0.5


def test_train_with_capture_time_on_keeps_them_out_of_the_weights_and_records_the_round(album):
    meta = json.loads((album.run / "meta.json").read_text())
    assert set(meta["capture_time"]["chosen_rounds"]) == {"image"}
    assert json.loads((album.run / "train_args.json").read_text())["capture_time"] is True
    log = [json.loads(x) for x in (album.run / "log.jsonl").read_text().splitlines()]
    assert all("capture_time" in e["val"] for e in log if e["stage"] == "iterative")


def test_evaluate_ignores_exif_unless_asked_and_then_labels_the_rows(album, tmp_path, capsys):
    out = {}
    for name, data, extra in (
        ("timed", album.timed, []),
        ("plain", album.plain, []),
        ("on", album.timed, ["--capture-time", "on"]),
    ):
        args = ["evaluate", "--data", str(data), "--run", str(album.run), "--quiet", "--json", str(tmp_path / name)]
        assert main(args + extra) == 0
        out[name] = (json.loads((tmp_path / name).read_text()), capsys.readouterr().out)
    assert out["timed"][0] == out["plain"][0] and "capture_time" not in out["timed"][0]
    assert "capture times" not in out["timed"][1]
    on, text = out["on"]
    assert {k: v for k, v in on.items() if k != "capture_time"} == out["timed"][0]
    r = json.loads((album.run / "meta.json").read_text())["capture_time"]["chosen_rounds"]["image"]
    assert on["capture_time"]["image"]["chosen_round"] == r
    assert f"guided + capture times (val-chosen: img {r})" in text and "fused orderer + capture times" in text
    assert "capture times on" in text.splitlines()[0] and "% of the photos placed by time" in text


def _mixed_story(album):
    """A test album with photos timed by one camera, photos timed by the other, and photos without a time."""
    for s in load_split(album.timed, "test"):
        cams = [t and t[1] for t in album.truth[s.id]]
        if len(s) >= 4 and None in cams and cams.count(CAMERAS[0]) >= 2:
            return s
    raise AssertionError("no mixed album in the test split")


def test_order_prints_which_photos_were_placed_by_time(album, tmp_path, capsys):
    s = _mixed_story(album)
    shown = list(reversed(range(len(s))))  # out of gold order
    images, names = [s.images[k] for k in shown], [Path(s.images[k]).name for k in shown]
    out_json, out_html = tmp_path / "o.json", tmp_path / "o.html"
    args = ["order", "--run", str(album.run), "--images", *images, "--sentences", *[s.sentences[k] for k in shown]]
    assert main(args + ["--json", str(out_json), "--html", str(out_html)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    before = precedence(read_capture_times(images))
    by_time = placed_by_time(before)
    assert [p["placed_by"] == "capture time" for p in r["capture_time"]["photos"]] == by_time.tolist()
    assert r["capture_time"]["used"] and by_time.any() and not by_time.all()
    for k, name in enumerate(names):
        line = next(x for x in text.splitlines() if f". {name}" in x)
        assert ("[placed by capture time 2024-" in line) == by_time[k] and ("[placed by the model]" in line) != by_time[
            k
        ]
    assert f"capture times: {int(by_time.sum())} of {len(s)} photos placed by their capture time" in text
    for order in (r["image_order"], r["variants"]["guided"]["image_order"], r["variants"]["image_only"]["order"]):
        pos = np.argsort(order)
        assert not (before & (pos[:, None] > pos[None, :])).any()
    page = out_html.read_text()
    assert page.count("placed by capture time 2024-") == by_time.sum() and 'data-key="capture-time"' in page
    off = order_stories(load_run(album.run)[0], stories_from_args(images, None), capture_time="off")[0]
    assert off["capture_time"] == {
        "mode": "off",
        "used": False,
        "photos": [{"time": None, "camera": None, "placed_by": "model"}] * len(s),
    }
