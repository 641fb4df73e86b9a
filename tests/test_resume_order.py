"""`iterwego order` and `iterwego evaluate --html` on the session's trained run; `--resume` without a state.

Resuming bit-identically after SIGKILL is tested in tests/test_reliability.py (three kills, one per stage group).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iterwego.apps.cli import main
from test_report import check_html, sentences_in


@pytest.fixture
def data(trained_run) -> Path:
    return trained_run.data


@pytest.fixture
def reference(trained_run) -> Path:
    return trained_run.run


def test_resume_without_state_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_args.json" in err[0]


def test_order_prints_orders_pairing_and_confidence(data, reference, tmp_path, capsys):
    test = json.loads((data / "test.story-in-sequence.json").read_text())
    anns = [a[0] for a in test["annotations"]]
    sid = anns[0]["story_id"]
    mine = sorted((a for a in anns if a["story_id"] == sid), key=lambda a: a["worker_arranged_photo_order"])
    images = [str(data / "images" / "test" / f"{a['photo_flickr_id']}.png") for a in mine][::-1]
    sentences = [a["text"] for a in mine]
    out_json = tmp_path / "o.json"
    html = tmp_path / "o.html"
    assert (
        main(
            [
                "order",
                "--run",
                str(reference),
                "--images",
                *images,
                "--sentences",
                *sentences,
                "--json",
                str(out_json),
                "--html",
                str(html),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    n = len(images)
    assert sorted(res["image_order"]) == list(range(n)) and sorted(res["sentence_order"]) == list(range(n))
    assert len(res["pairing"]) == n and sorted(p[1] for p in res["pairing"]) == list(range(n))
    assert set(res["variants"]) == {"image_only", "text_only", "guided", "fused"}
    assert len(res["variants"]["fused"]["confidence"]) == n - 1
    assert "P(next after this)" in printed and Path(images[res["image_order"][0]]).name in printed
    # the self-contained report shows the sentences under the images in the predicted order
    c = check_html(html)
    assert sentences_in(c, "predicted", "album") == [sentences[t] for t in res["sentence_order"]]


def test_order_single_modality_and_unequal_counts(data, reference, tmp_path):
    imgs = sorted((data / "images" / "test").glob("*.png"))[:3]
    out = tmp_path / "a.json"
    assert (
        main(
            [
                "order",
                "--run",
                str(reference),
                "--images",
                *map(str, imgs),
                "--sentences",
                "a red circle .",
                "a black star .",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["mode"] == "unimodal" and "2 sentences" in res["note"]
    assert sorted(res["image_order"]) == [0, 1, 2] and sorted(res["sentence_order"]) == [0, 1]
    assert main(["order", "--run", str(reference), "--sentences", "x .", "y .", "z .", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "image_order" not in res and sorted(res["sentence_order"]) == [0, 1, 2]


def test_order_rejects_a_single_item(reference, capsys):
    assert main(["order", "--run", str(reference), "--sentences", "only one ."]) == 2
    assert "at least 2 items" in capsys.readouterr().err


def test_evaluate_html_report(data, reference, tmp_path):
    html = tmp_path / "rep" / "report.html"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--run",
                str(reference),
                "--split",
                "test",
                "--quiet",
                "--html",
                str(html),
            ]
        )
        == 0
    )
    text = html.read_text()
    assert "<table" in text and "http://" not in text and "https://" not in text
    assert (html.parent / "report_files" / "metrics_per_round.png").is_file()
