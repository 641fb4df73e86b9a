"""`iterwego order --albums`: many albums (a JSONL file or a folder of album folders) ordered in one process."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from iterwego.apps.albums import CAPTIONS, read_albums
from iterwego.apps.cli import main
from iterwego.errors import DataError

SENTENCES = ["the tank is empty .", "at hour six the water rises .", "the tank is full at hour nine ."]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def album_tree(trained_run, tmp_path):
    """Two album folders: three photos with captions.txt, and two photos alone; plus a hidden folder (skipped)."""
    photos = sorted((trained_run.data / "images" / "test").iterdir())
    root = tmp_path / "albums"
    for name, n, captions in (("beach", 3, SENTENCES), ("attic", 2, None)):
        (root / name).mkdir(parents=True)
        for p in photos[:n]:
            shutil.copy(p, root / name / p.name)
        if captions:
            (root / name / CAPTIONS).write_text("\n".join(captions[:1] + [""] + captions[1:]) + "\n")
        (root / name / "notes.md").write_text("not a photo")
    (root / ".thumbs").mkdir()
    return root


def test_a_folder_of_albums_is_ordered_in_one_process_with_times(trained_run, album_tree, tmp_path):
    albums = read_albums(album_tree)
    assert [a.id for a in albums] == ["attic", "beach"]  # sorted, the hidden folder skipped
    beach = albums[1]
    assert [it.sentence for it in beach.items] == SENTENCES  # blank lines skipped
    assert all(it.image.endswith(".png") for it in beach.items)
    assert [it.sentence for it in albums[0].items] == [None, None]  # photos only: ordered alone
    out_json = tmp_path / "out.json"
    rc, out, err = _run(["order", "--run", str(trained_run.run), "--albums", str(album_tree), "--json", str(out_json)])
    assert rc == 0, err
    assert out.count("ordered in ") == 2 and "ordered 2 album(s) in " in out and "per album" in out
    results = json.loads(out_json.read_text())
    assert [r["id"] for r in results] == ["attic", "beach"]
    assert sorted(results[1]["image_order"]) == [0, 1, 2] and sorted(results[1]["sentence_order"]) == [0, 1, 2]
    assert sorted(results[0]["image_order"]) == [0, 1]


def test_a_jsonl_of_albums_orders_each_with_its_time(trained_run, tmp_path):
    photos = sorted(str(p) for p in (trained_run.data / "images" / "test").iterdir())
    lines = [
        {"id": "one", "images": photos[:3], "sentences": SENTENCES},
        {"id": "two", "sentences": SENTENCES[:2]},
    ]
    f = tmp_path / "albums.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, out, err = _run(["order", "--run", str(trained_run.run), "--albums", str(f)])
    assert rc == 0, err
    assert "story one (fused" in out and "story two (unimodal" in out and out.count("ordered in ") == 2


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: root / "missing", "no such album file or folder"),
        (lambda root: root, "no album folders in it"),
        (lambda root: (root / "empty").mkdir() or root, "empty: an album folder with no photos"),
        (lambda root: _bad_captions(root), "captions.txt: not valid UTF-8"),
        (lambda root: _one_caption(root), "story solo: a story needs at least 2 items to order, got 1"),
        (lambda root: _jsonl(root, '{"id": "x", "images": ["nope.png"]}\n'), "nope.png: file not found"),
        (lambda root: _jsonl(root, '{"id": "x"\n'), "line 1: malformed JSON"),
    ],
)
def test_bad_albums_are_one_line_errors(trained_run, tmp_path, make, message):
    root = tmp_path / "root"
    root.mkdir()
    rc, out, err = _run(["order", "--run", str(trained_run.run), "--albums", str(make(root))])
    assert rc == 2 and not out
    assert err.count("\n") == 1 and err.startswith("iterwego order: error: ") and message in err, err


def test_albums_and_another_input_are_refused(trained_run, tmp_path):
    rc, _, err = _run(["order", "--run", str(trained_run.run), "--albums", str(tmp_path), "--sentences", "a", "b"])
    assert rc == 2 and "give one of --albums, --jsonl or --images/--sentences" in err
    with pytest.raises(DataError, match="no album folders"):
        read_albums(tmp_path)


def _bad_captions(root):
    (root / "a").mkdir()
    (root / "a" / CAPTIONS).write_bytes("caf\u00e9 au lait\nsecond\n".encode("latin-1"))
    return root


def _one_caption(root):
    (root / "solo").mkdir()
    (root / "solo" / CAPTIONS).write_text("only one sentence\n")
    return root


def _jsonl(root, text):
    (root / "a.jsonl").write_text(text)
    return root / "a.jsonl"
