"""Readers, load_split and stats on fixture files the tests write themselves."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from iterwego.apps.cli import main
from iterwego.data.readers import (
    Story,
    dataset_stats,
    format_stats,
    load_split,
    read_jsonl,
    read_tacos,
    read_vist,
    split_image_dir,
)
from iterwego.errors import DataError, ImageError

# ----------------------------------------------------------------- fixture writers


def img(path: Path, colour=(200, 10, 10), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def truncated(path: Path) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut: only a full decode notices
    return path


def vist_annotations(stories: dict[str, list[tuple[str, str]]], *, seed: int = 0, extra=None) -> list:
    """Annotations for {story_id: [(photo_id, text) in gold order]}, deliberately out of order in the file."""
    anns = []
    for sid, items in stories.items():
        for pos, (pid, text) in enumerate(items):
            a = {
                "story_id": sid,
                "photo_flickr_id": pid,
                "worker_arranged_photo_order": pos,
                "text": text.lower(),
                "original_text": text,
                "album_id": "alb" + sid,
                "storylet_id": f"{sid}-{pos}",
            }
            a.update(extra or {})
            anns.append([a])
    random.Random(seed).shuffle(anns)
    return anns


def write_vist(path: Path, stories, *, image_dir: Path | None = None, ext=".jpg", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "albums": [], "annotations": vist_annotations(stories, seed=seed)}))
    if image_dir is not None:
        for items in stories.values():
            for pid, _ in items:
                img(image_dir / f"{pid}{ext}")
    return path


def story_spec(sid: str, n: int) -> list[tuple[str, str]]:
    return [(f"{sid}{k:02d}", f"Story {sid} Sentence {k}.") for k in range(n)]


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def first_appearance(anns) -> list[str]:
    return list(dict.fromkeys(a[0]["story_id"] for a in anns))


# ----------------------------------------------------------------- VIST / TACoS
def test_read_vist_gold_order_not_file_order(tmp_path):
    spec = {"s1": story_spec("1", 5), "s2": story_spec("2", 5), "s3": story_spec("3", 4)}
    j = write_vist(tmp_path / "test.story-in-sequence.json", spec, image_dir=tmp_path / "imgs")
    anns = json.loads(j.read_text())["annotations"]
    assert [a[0]["worker_arranged_photo_order"] for a in anns if a[0]["story_id"] == "s1"] != list(range(5))

    stories = read_vist(j, tmp_path / "imgs")
    assert [s.id for s in stories] == first_appearance(anns)
    for s in stories:
        assert [it.key for it in s.items] == [pid for pid, _ in spec[s.id]]
        assert s.sentences == [t.lower() for _, t in spec[s.id]]
        assert s.images == [str((tmp_path / "imgs" / f"{pid}.jpg").resolve()) for pid, _ in spec[s.id]]
        assert s.meta["album_id"] == "alb" + s.id
        assert s.meta["storylet_ids"] == [f"{s.id}-{k}" for k in range(len(s))]

    orig = read_vist(j, tmp_path / "imgs", text_field="original_text")
    assert orig[0].sentences == [t for _, t in spec[orig[0].id]]


def test_read_vist_finds_every_extension_and_prefers_jpg(tmp_path):
    spec = {"s": [("p0", "a"), ("p1", "b"), ("p2", "c"), ("p3", "d"), ("p4", "e")]}
    j = write_vist(tmp_path / "x.json", spec)
    d = tmp_path / "imgs"
    for pid, ext in zip(["p0", "p1", "p2", "p3", "p4"], [".png", ".JPG", ".gif", ".bmp", ".PNG"]):
        img(d / f"{pid}{ext}")
    img(d / "p0.jpg")  # both p0.jpg and p0.png: .jpg wins
    (d / "notes.txt").write_text("ignored")
    names = [Path(p).name for p in read_vist(j, d)[0].images]
    assert names == ["p0.jpg", "p1.JPG", "p2.gif", "p3.bmp", "p4.PNG"]


def test_read_vist_text_only_and_unchecked_missing_images(tmp_path):
    j = write_vist(tmp_path / "x.json", {"s": story_spec("1", 3)})
    assert read_vist(j, None)[0].images == [None, None, None]
    # check off: a missing photo keeps its expected path (never a substitute image)
    s = read_vist(j, tmp_path / "nowhere", check_images=False)[0]
    assert s.images[0].endswith("100.jpg") and s.sentences[0] == "story 1 sentence 0."


def test_read_tacos_lengths_3_and_7(tmp_path):
    spec = {"v1": story_spec("a", 3), "v2": story_spec("b", 7), "v3": story_spec("c", 1)}
    j = write_vist(
        tmp_path / "tacos" / "test.story-in-sequence.json", spec, image_dir=tmp_path / "tacos" / "images" / "test"
    )
    stories = read_tacos(j, tmp_path / "tacos" / "images" / "test")
    assert sorted(len(s) for s in stories) == [1, 3, 7]
    by_id = {s.id: s for s in stories}
    assert [it.key for it in by_id["v2"].items] == [p for p, _ in spec["v2"]]
    assert [len(s) for s in load_split(tmp_path / "tacos", "test", fmt="tacos")] == [len(s) for s in stories]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_read_vist_recovers_gold_order_for_any_file_order(lengths, seed):
    spec = {f"s{i}": story_spec(str(i), n) for i, n in enumerate(lengths)}
    with tempfile.TemporaryDirectory() as d:
        j = write_vist(Path(d) / "t.json", spec, seed=seed)
        anns = json.loads(j.read_text())["annotations"]
        stories = read_vist(j, None)
    assert [s.id for s in stories] == first_appearance(anns)
    for s in stories:
        assert [it.key for it in s.items] == [p for p, _ in spec[s.id]]


# ----------------------------------------------------------------- JSONL
def test_read_jsonl_modalities_and_paths(tmp_path):
    img(tmp_path / "pics" / "a.png")
    img(tmp_path / "pics" / "b.png")
    abs_img = img(tmp_path / "elsewhere" / "c.jpg")
    f = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "both", "images": ["pics/a.png", "pics/b.png"], "sentences": ["first.", ""], "lang": "en"},
            "",
            {"id": 7, "images": [str(abs_img), "pics/a.png"]},
            "   ",
            {"id": "text", "sentences": ["one", "two", "three"]},
        ],
    )
    stories = read_jsonl(f)
    assert [s.id for s in stories] == ["both", "7", "text"]
    both, imgs, text = stories
    assert both.images == [str((tmp_path / "pics" / "a.png").resolve()), str((tmp_path / "pics" / "b.png").resolve())]
    assert both.sentences == ["first.", ""]  # empty sentence allowed
    assert both.meta["lang"] == "en" and both.meta["line"] == 1
    assert imgs.images[0] == str(abs_img) and imgs.sentences == [None, None] and imgs.meta["line"] == 3
    assert imgs.has_images and not imgs.has_sentences
    assert text.images == [None, None, None] and text.has_sentences and not text.has_images
    assert [it.key for it in both.items] == ["pics/a.png", "pics/b.png"]


def test_read_jsonl_image_root(tmp_path):
    img(tmp_path / "root" / "x.png")
    f = write_jsonl(tmp_path / "sub" / "d.jsonl", [{"id": "s", "images": ["x.png"]}])
    with pytest.raises(ImageError):
        read_jsonl(f)
    assert read_jsonl(f, image_root=tmp_path / "root")[0].images == [str((tmp_path / "root" / "x.png").resolve())]


# ----------------------------------------------------------------- load_split layouts
def test_load_split_standard_layout_and_overrides(tmp_path):
    d = tmp_path / "data"
    write_vist(d / "val.story-in-sequence.json", {"s": story_spec("1", 3)}, image_dir=d / "images" / "val")
    assert len(load_split(d, "val")[0]) == 3

    # SIND: images elsewhere, per-split subdirectory
    sind = tmp_path / "sind_images"
    for pid, _ in story_spec("1", 3):
        img(sind / "val" / f"{pid}.jpg")
    s = load_split(d, "val", image_dir=sind)[0]
    assert Path(s.images[0]).parent == (sind / "val").resolve()

    # flat image dir
    flat = tmp_path / "flat"
    for pid, _ in story_spec("1", 3):
        img(flat / f"{pid}.jpg")
    assert Path(load_split(d, "val", image_dir=flat)[0].images[0]).parent == flat.resolve()

    # both shapes present: the per-split subdirectory wins
    for pid, _ in story_spec("1", 3):
        img(flat / "val" / f"{pid}.jpg")
    assert split_image_dir(d, "val", flat) == flat / "val"
    assert Path(load_split(d, "val", image_dir=flat)[0].images[0]).parent == (flat / "val").resolve()


def test_load_split_jsonl_dir_or_file(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", [{"id": "a", "sentences": ["x", "y"]}])
    assert load_split(tmp_path, "test", fmt="jsonl")[0].sentences == ["x", "y"]
    assert load_split(f, "ignored", fmt="jsonl")[0].id == "a"


def test_load_split_missing_split_and_dir(tmp_path):
    with pytest.raises(DataError, match="train.story-in-sequence.json"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="not found") as ei:
        load_split(tmp_path / "nodir", "train")
    assert "nodir" in str(ei.value)


def test_missing_image_is_never_replaced(tmp_path):
    d = tmp_path / "data"
    write_vist(d / "test.story-in-sequence.json", {"s9": story_spec("9", 3)}, image_dir=d / "images" / "test")
    (d / "images" / "test" / "901.jpg").unlink()
    with pytest.raises(ImageError) as ei:
        load_split(d, "test")
    msg = str(ei.value)
    assert "test.story-in-sequence.json" in msg and "story s9" in msg and "901" in msg


# ----------------------------------------------------------------- bad input
def _vist_bad(tmp_path: Path, case: str) -> tuple[Path, Path | None, str]:
    """Write one broken VIST file; return (json path, image dir, text the message must contain)."""
    d = tmp_path / "imgs"
    spec = {"s42": story_spec("4", 3)}
    j = tmp_path / "bad.story-in-sequence.json"
    anns = [[a[0]] for a in vist_annotations(spec)]

    def dump(obj):
        j.write_text(json.dumps(obj))

    if case == "malformed":
        j.write_text('{"annotations": [\n  [{"story_id": "s42",}]\n]}')
        return j, None, "line 2"
    if case == "not_utf8":
        j.write_bytes(b'{"annotations": [\n[{"story_id": "s42", "text": "caf\xe9"}]]}')
        return j, None, "line 2"
    if case == "missing_key":
        del anns[1][0]["worker_arranged_photo_order"]
    elif case == "missing_text_field":
        del anns[0][0]["text"]
    elif case == "duplicate_pos":
        for a in anns:
            if a[0]["worker_arranged_photo_order"] == 2:
                a[0]["worker_arranged_photo_order"] = 0
    elif case == "gap_pos":
        for a in anns:
            if a[0]["worker_arranged_photo_order"] == 2:
                a[0]["worker_arranged_photo_order"] = 5
    elif case == "pos_type":
        anns[0][0]["worker_arranged_photo_order"] = "1"
    elif case == "text_type":
        anns[0][0]["text"] = ["not", "a", "string"]
    elif case == "empty":
        dump({"annotations": []})
        return j, None, "no stories"
    elif case == "no_annotations":
        dump({"images": []})
        return j, None, "annotations"
    elif case == "missing_image":
        for pid, _ in spec["s42"][1:]:
            img(d / f"{pid}.jpg")
        dump({"annotations": anns})
        return j, d, "story s42"
    elif case in ("zero_byte_image", "truncated_image", "text_as_image"):
        for pid, _ in spec["s42"]:
            img(d / f"{pid}.jpg")
        bad = d / f"{spec['s42'][1][0]}.jpg"
        if case == "zero_byte_image":
            bad.write_bytes(b"")
        elif case == "truncated_image":
            truncated(bad)
        else:
            bad.write_text("hello")
        dump({"annotations": anns})
        return j, d, "story s42"
    else:
        raise AssertionError(case)
    dump({"annotations": anns})
    return j, None, "story s42"


VIST_BAD = [
    "malformed",
    "not_utf8",
    "missing_key",
    "missing_text_field",
    "duplicate_pos",
    "gap_pos",
    "pos_type",
    "text_type",
    "empty",
    "no_annotations",
    "missing_image",
    "zero_byte_image",
    "truncated_image",
    "text_as_image",
]


@pytest.mark.parametrize("case", VIST_BAD)
def test_vist_bad_input(tmp_path, case):
    j, d, where = _vist_bad(tmp_path, case)
    with pytest.raises(DataError) as ei:
        read_vist(j, d)
    msg = str(ei.value)
    assert j.name in msg and where in msg and "\n" not in msg
    if "image" in case:
        assert isinstance(ei.value, ImageError)


def test_vist_bad_positions_messages(tmp_path):
    j, _, _ = _vist_bad(tmp_path, "duplicate_pos")
    with pytest.raises(DataError, match="duplicate worker_arranged_photo_order 0"):
        read_vist(j, None)
    j, _, _ = _vist_bad(tmp_path, "gap_pos")
    with pytest.raises(DataError, match=r"not 0\.\.2"):
        read_vist(j, None)


JSONL_BAD = {
    "malformed": ['{"id": "a", "sentences": ["x"]}', '{"id": "b", "sentences": ["x"]', "line 2"],
    "missing_id": ['{"id": "a", "sentences": ["x"]}', '{"sentences": ["x"]}', "line 2"],
    "neither_list": ['{"id": "z"}', "story z"],
    "count_mismatch": ['{"id": "m", "images": ["a.png", "b.png"], "sentences": ["only one"]}', "story m"],
    "empty_story": ['{"id": "e", "sentences": []}', "story e"],
    "sentences_not_list": ['{"id": "t", "sentences": "one string"}', "story t"],
    "sentence_not_string": ['{"id": "t", "sentences": ["ok", 3]}', "story t"],
    "not_object": ['["id", "a"]', "line 1"],
    "duplicate_id": ['{"id": "d", "sentences": ["x"]}', '{"id": "d", "sentences": ["y"]}', "story d"],
    "missing_image": ['{"id": "f", "sentences": ["x"]}', '{"id": "g", "images": ["gone.png"]}', "line 2, story g"],
    "empty_file": ["", "no stories"],
}


@pytest.mark.parametrize("case", sorted(JSONL_BAD) + ["not_utf8"])
def test_jsonl_bad_input(tmp_path, case):
    f = tmp_path / "bad.jsonl"
    if case == "not_utf8":
        f.write_bytes(b'{"id": "a", "sentences": ["x"]}\n{"id": "b", "sentences": ["\xff"]}\n')
        where = "line 2"
    else:
        *lines, where = JSONL_BAD[case]
        write_jsonl(f, lines)
    with pytest.raises(DataError) as ei:
        read_jsonl(f)
    msg = str(ei.value)
    assert f.name in msg and where in msg and "\n" not in msg


# ----------------------------------------------------------------- stats
def stats_fixture(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    train = {"t1": story_spec("1", 3), "t2": story_spec("2", 5), "t3": story_spec("3", 5)}
    j = write_vist(d / "train.story-in-sequence.json", train, image_dir=d / "images" / "train")
    anns = json.loads(j.read_text())
    anns["annotations"][0][0]["text"] = "  "  # one empty sentence
    j.write_text(json.dumps(anns))
    (d / "images" / "train" / "100.jpg").unlink()  # missing
    truncated(d / "images" / "train" / "201.jpg")  # unreadable
    (d / "images" / "train" / "302.jpg").write_bytes(b"")  # unreadable
    write_vist(d / "test.story-in-sequence.json", {"x": story_spec("9", 4)}, image_dir=d / "images" / "test")
    return d


def test_dataset_stats_counts_and_problems(tmp_path):
    d = stats_fixture(tmp_path)
    stats = dataset_stats(d)
    tr, va, te = (stats["splits"][s] for s in ("train", "val", "test"))
    assert va == {"present": False, "path": str(d / "val.story-in-sequence.json")}
    assert (tr["stories"], tr["items"], tr["lengths"]) == (3, 13, {3: 1, 5: 2})
    assert tr["empty_sentences"] == 1
    assert tr["mean_sentence_words"] == pytest.approx((12 * 4 + 0) / 13)  # one float64 division: CPU-independent
    assert [Path(p).name for p in tr["images_missing"]] == ["100.jpg"]
    assert sorted(Path(p).name for p, _ in tr["images_unreadable"]) == ["201.jpg", "302.jpg"]
    assert (te["stories"], te["items"], te["images_missing"], te["images_unreadable"]) == (1, 4, [], [])
    assert len(stats["problems"]) == 2 and all(p.startswith("train:") and "\n" not in p for p in stats["problems"])
    json.dumps(stats)  # the CLI's --json needs this

    text = format_stats(stats)
    assert "val: absent" in text and "100.jpg" in text and "201.jpg" in text and "problems:" in text
    assert "3: 1, 5: 2" in text


def test_dataset_stats_caps_listed_paths(tmp_path):
    d = tmp_path / "data"
    write_vist(d / "test.story-in-sequence.json", {"big": story_spec("1", 25)})  # no images at all
    stats = dataset_stats(d, splits=("test",))
    assert len(stats["splits"]["test"]["images_missing"]) == 25
    text = format_stats(stats)
    assert "and 15 more" in text and text.count("test missing:") == 11


def test_dataset_stats_no_splits_names_dir_and_files(tmp_path):
    with pytest.raises(DataError) as ei:
        dataset_stats(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "train.story-in-sequence.json" in msg and "test.story-in-sequence.json" in msg


def test_dataset_stats_jsonl(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", [{"id": "a", "sentences": ["two words", "three more words"]}])
    st_ = dataset_stats(tmp_path, fmt="jsonl")
    assert st_["splits"]["val"]["mean_sentence_words"] == 2.5 and not st_["splits"]["train"]["present"]
    assert st_["problems"] == []


def test_cli_stats(tmp_path, capsys):
    d = stats_fixture(tmp_path)
    assert main(["stats", str(d)]) == 0
    assert "val: absent" in capsys.readouterr().out
    assert main(["stats", str(d), "--strict"]) == 1
    capsys.readouterr()
    assert main(["stats", str(d), "--json", "--splits", "test"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["splits"]["test"]["stories"] == 1 and parsed["problems"] == []


@pytest.mark.parametrize("case", ["no_dir", "no_splits", "malformed"])
def test_cli_stats_bad_input_one_line(tmp_path, capsys, case):
    if case == "malformed":
        (tmp_path / "train.story-in-sequence.json").write_text("{oops")
    target = tmp_path / "absent" if case == "no_dir" else tmp_path
    code = main(["stats", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(target) in err


def test_readers_return_story_objects(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "sentences": ["x"]}])
    assert all(isinstance(s, Story) for s in read_jsonl(f))
