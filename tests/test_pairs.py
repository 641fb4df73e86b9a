"""The authors' pair TSV: format facts, round trip, errors, and the prepare-pairs command."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from iterwego.apps.cli import main
from iterwego.data.pairs import read_pairs, write_pairs
from iterwego.data.readers import Item, Story, load_split
from iterwego.errors import DataError


def text_story(sid: str, n: int) -> Story:
    return Story(id=sid, items=[Item(sentence=f"{sid} says {k}", key=f"{sid}_{k}") for k in range(n)])


def rows_of(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


# ----------------------------------------------------------------- format facts
def test_write_pairs_format(tmp_path):
    stories = [text_story("a", 4), text_story("b", 2), text_story("c", 5)]
    out = write_pairs(stories, tmp_path / "new" / "dir", split="test")
    assert out == tmp_path / "new" / "dir" / "test.tsv"
    raw = out.read_bytes()
    assert raw.count(b"\r\n") == 6 + 1 + 10 and raw.endswith(b"\r\n")  # csv's default line ends, no header
    rows = rows_of(out)
    assert [r[0] for r in rows] == ["1-4-6"] * 6 + ["2-2-1"] + ["3-5-10"] * 10
    for r in rows:
        assert len(r) == 6
        story = stories[int(r[0].split("-")[0]) - 1]
        a, b = int(r[4]), int(r[5])
        assert r[1] == story.items[a].sentence and r[2] == story.items[b].sentence
        assert r[3] == ("1" if a < b else "0")
    # i-major enumeration of unordered pairs, each exactly once
    pairs = [tuple(sorted((int(r[4]), int(r[5])))) for r in rows if r[0] == "1-4-6"]
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert not [p for p in out.parent.iterdir() if p.name != "test.tsv"]  # no temp file left


def test_directions_are_seeded_and_about_half_flipped(tmp_path):
    stories = [text_story(str(k), 6) for k in range(40)]  # 600 pairs
    a = write_pairs(stories, tmp_path / "a", split="train", seed=3).read_bytes()
    b = write_pairs(stories, tmp_path / "b", split="train", seed=3).read_bytes()
    c = write_pairs(stories, tmp_path / "c", split="train", seed=4).read_bytes()
    assert a == b and a != c
    labels = np.array([int(r[3]) for r in rows_of(tmp_path / "a" / "train.tsv")])
    assert 0.4 < labels.mean() < 0.6


def test_image_modality_writes_ids_or_file_names(tmp_path):
    with_keys = Story("k", [Item(image="/x/111.jpg", key="111"), Item(image="/x/222.jpg", key="222")])
    no_keys = Story("f", [Item(image="/y/p.png"), Item(image="/y/q.png")])
    out = write_pairs([with_keys, no_keys], tmp_path, split="val", modality="image")
    assert sorted(read_pairs(out, modality="image")[0].items[i].key for i in (0, 1)) == ["111", "222"]
    assert [it.key for it in read_pairs(out, modality="image")[1].items] == ["p.png", "q.png"]


def test_write_pairs_needs_the_modality(tmp_path):
    s = Story("nosent", [Item(image="/a.jpg", key="a"), Item(image="/b.jpg", key="b")])
    with pytest.raises(DataError, match="story nosent"):
        write_pairs([s], tmp_path, split="test")
    assert not (tmp_path / "test.tsv").exists()


# ----------------------------------------------------------------- round trip
def test_round_trip_keeps_order_and_text(tmp_path):
    stories = [text_story("a", 5), text_story("b", 3), text_story("c", 7)]
    back = read_pairs(write_pairs(stories, tmp_path, split="test", seed=11))
    assert [s.sentences for s in back] == [s.sentences for s in stories]
    assert [s.id for s in back] == ["1", "2", "3"] and back[1].meta["docid"] == "2-3-3"


tricky_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stories=st.lists(
        st.lists(tricky_text | st.sampled_from(["a\tb", 'say "hi"', "two\nlines", "\r", ""]), min_size=2, max_size=7),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(stories, seed):
    objs = [Story(id=f"s{k}", items=[Item(sentence=t) for t in sents]) for k, sents in enumerate(stories)]
    with tempfile.TemporaryDirectory() as d:
        back = read_pairs(write_pairs(objs, d, split="x", seed=seed))
    assert [s.sentences for s in back] == stories


# ----------------------------------------------------------------- read errors
GOOD = ["1-3-3\tA\tB\t1\t0\t1", "1-3-3\tC\tA\t0\t2\t0", "1-3-3\tB\tC\t1\t1\t2"]

BAD_ROWS = {
    "five_fields": (GOOD[:1] + ["1-3-3\tC\tA\t0\t2"] + GOOD[2:], 2),
    "bad_label": (GOOD[:2] + ["1-3-3\tB\tC\tyes\t1\t2"], 3),
    "label_vs_positions": (GOOD[:1] + ["1-3-3\tC\tA\t1\t2\t0"] + GOOD[2:], 2),
    "position_out_of_range": (GOOD[:1] + ["1-3-3\tC\tA\t0\t3\t0"], 2),
    "position_conflict": (GOOD[:2] + ["1-3-3\tB\tZ\t1\t1\t2"], 3),
    "repeated_pair": (GOOD[:2] + ["1-3-3\tA\tB\t1\t0\t1"], 3),
    "missing_pair_rows": (GOOD[:2] + ["2-2-1\tx\ty\t1\t0\t1"], 1),
    "bad_docid": (["1-3\tA\tB\t1\t0\t1"], 1),
    "docid_pair_count": (["1-3-2\tA\tB\t1\t0\t1"], 1),
    "not_contiguous": (["1-2-1\ta\tb\t1\t0\t1", "2-2-1\tc\td\t1\t0\t1", "1-2-1\ta\tb\t1\t0\t1"], 3),
    "non_integer_position": (["1-2-1\ta\tb\t1\tzero\t1"], 1),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_read_pairs_errors_name_file_and_line(tmp_path, case):
    lines, line = BAD_ROWS[case]
    p = tmp_path / "bad.tsv"
    p.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        read_pairs(p)
    msg = str(ei.value)
    assert "bad.tsv" in msg and f"line {line}" in msg and "\n" not in msg


def test_read_pairs_non_utf8_and_empty(tmp_path):
    p = tmp_path / "bin.tsv"
    p.write_bytes(("\r\n".join(GOOD) + "\r\n").encode() + b"2-2-1\t\xff\tb\t1\t0\t1\r\n")
    with pytest.raises(DataError, match="line 4"):
        read_pairs(p)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="empty.tsv"):
        read_pairs(tmp_path / "empty.tsv")


def test_read_pairs_accepts_authors_style_file(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("\r\n".join(GOOD) + "\r\n", encoding="utf-8")
    (s,) = read_pairs(p)
    assert s.sentences == ["A", "B", "C"]


# ----------------------------------------------------------------- CLI prepare-pairs
def vist_dir(root: Path, *, with_images: bool) -> Path:
    anns = []
    for sid, n in (("s1", 3), ("s2", 7)):
        for pos in reversed(range(n)):  # file order is not gold order
            anns.append(
                [
                    {
                        "story_id": sid,
                        "photo_flickr_id": f"{sid}p{pos}",
                        "worker_arranged_photo_order": pos,
                        "text": f"{sid} sentence {pos}",
                        "original_text": f"{sid.upper()} Sentence {pos}.",
                    }
                ]
            )
            if with_images:
                (root / "images" / "test").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(root / "images" / "test" / f"{sid}p{pos}.jpg")
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.story-in-sequence.json").write_text(json.dumps({"annotations": anns}))
    return root


def test_cli_prepare_pairs_sentences(tmp_path, capsys):
    d = vist_dir(tmp_path / "data", with_images=False)  # sentences need no images
    assert main(["prepare-pairs", str(d), "--out", str(tmp_path / "out"), "--seed", "5"]) == 0
    assert "test.tsv" in capsys.readouterr().out
    back = read_pairs(tmp_path / "out" / "test.tsv")
    gold = load_split(d, "test", check_images=False)
    assert [s.sentences for s in back] == [s.sentences for s in gold]
    assert len(rows_of(tmp_path / "out" / "test.tsv")) == 3 + 21

    assert main(["prepare-pairs", str(d), "--out", str(tmp_path / "o2"), "--text-field", "original_text"]) == 0
    assert read_pairs(tmp_path / "o2" / "test.tsv")[0].sentences[0] == "S1 Sentence 0."


def test_cli_prepare_pairs_images(tmp_path, capsys):
    d = vist_dir(tmp_path / "data", with_images=True)
    assert main(["prepare-pairs", str(d), "--out", str(tmp_path / "out"), "--modality", "image"]) == 0
    back = read_pairs(tmp_path / "out" / "test.tsv", modality="image")
    assert [it.key for it in back[1].items] == [f"s2p{k}" for k in range(7)]

    (d / "images" / "test" / "s2p4.jpg").unlink()  # images are checked for the image modality
    code = main(["prepare-pairs", str(d), "--out", str(tmp_path / "out2"), "--modality", "image"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "story s2" in err and "s2p4" in err and not (tmp_path / "out2" / "test.tsv").exists()


@pytest.mark.parametrize("case", ["missing_split", "malformed"])
def test_cli_prepare_pairs_bad_input(tmp_path, capsys, case):
    d = vist_dir(tmp_path / "data", with_images=False)
    if case == "malformed":
        (d / "test.story-in-sequence.json").write_text('{"annotations": [[{"story_id": 1}]]}')
    split = "val" if case == "missing_split" else "test"
    code = main(["prepare-pairs", str(d), "--split", split, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{split}.story-in-sequence.json" in err
