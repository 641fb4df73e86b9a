"""`iterwego order` and `iterwego evaluate --html` on the session's trained run; `--resume` without a state.

Resuming bit-identically after SIGKILL is tested in tests/test_reliability.py (four kills, one per stage group).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN_ARGS, fork_cli
from iterwego.apps.cli import main
from test_report import check_html, sentences_in


@pytest.fixture
def data(trained_run) -> Path:
    return trained_run.data


@pytest.fixture
def reference(trained_run) -> Path:
    return trained_run.run


def _fork_slow_train(argv: list[str], mark: Path) -> int:
    """``iterwego ARGV`` forked, its store filling slowly enough to be killed: in the child only, 64-row shards,
    a text backbone that takes 0.1 s per chunk, and a file ``mark`` touched at the first optimiser step."""

    def slow() -> None:
        import iterwego.data.cache as cache
        import iterwego.encoders as enc
        import iterwego.training.recipe as recipe

        cache.SHARD_ROWS = 64
        featurize, step = enc.BertBackbone.featurize, recipe.TrainRecipe._step
        enc.BertBackbone.featurize = lambda self, items: (time.sleep(0.1), featurize(self, items))[1]

        def marked(self, *a, **k):
            mark.touch()
            time.sleep(0.2)
            return step(self, *a, **k)

        recipe.TrainRecipe._step = marked

    return fork_cli(argv, slow)


def _text_shards(run: Path) -> int:
    for d in (run / "features").glob("v2/*"):
        if (d / "identity.txt").is_file() and (d / "identity.txt").read_text().startswith("bert:"):
            return len(list(d.glob("*.safetensors")))
    return 0


def _kill_when(pid: int, ready, what: str) -> None:
    deadline = time.time() + 240
    while not ready() and time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done, f"training ended before {what}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_killed_during_feature_extraction_and_first_epoch_resumes_identically(data, reference, tmp_path, capsys):
    """SIGKILL while the store fills, then (resumed) during the first epoch: no checkpoint exists either time."""
    run, mark = tmp_path / "run", tmp_path / "stepped"
    # --no-cache: the run keeps its features in its private store, RUN/features, which the kills interrupt
    pid = _fork_slow_train(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--no-cache"], mark)
    _kill_when(pid, lambda: _text_shards(run) >= 1, "its text features were half stored")
    stored = _text_shards(run)
    assert 1 <= stored and not mark.exists() and not (run / "train_state.pt").exists()
    assert (run / "train_args.json").is_file()

    pid = _fork_slow_train(["train", "--resume", str(run), "--quiet"], mark)
    _kill_when(pid, mark.exists, "its first optimiser step")
    assert _text_shards(run) > stored and not (run / "train_state.pt").exists()

    assert main(["train", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "log.jsonl").read_text() == (run / "log.jsonl").read_text()
    assert not (run / "features").exists()  # the private store goes once the run is saved


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


def test_a_state_saved_before_the_inference_section_existed_resumes(data, tmp_path):
    """0.2 saved its training state and train_args.json without the config's `inference` section: 0.3 resumes
    it (the section takes its defaults), and a state whose config really differs is still refused."""
    from iterwego.config import preset
    from iterwego.errors import ModelLoadError
    from iterwego.training.recipe import TrainRecipe, resume_recipe

    run = tmp_path / "run"
    cfg = preset("tiny").override([a for a in TRAIN_ARGS[2::2]] + ["train.unimodal_epochs=1"])
    r = TrainRecipe(cfg, data, run, progress=False, log=lambda *a, **k: None)
    r.setup()
    r.fit_unimodal("image")  # one epoch: one checkpoint
    r.cleanup()
    state = torch.load(run / "train_state.pt", weights_only=True)
    saved = json.loads(state["config"])
    saved.pop("inference")
    state["config"] = json.dumps(saved)
    torch.save(state, run / "train_state.pt")
    args = json.loads((run / "train_args.json").read_text())
    args["config"].pop("inference")
    (run / "train_args.json").write_text(json.dumps(args))
    again = resume_recipe(run, progress=False, log=lambda *a, **k: None)
    assert again.resumed.stage == "unimodal-image"  # its "done" checkpoint, loaded
    again.cleanup()
    saved["train"]["lr"] = 0.5  # a real difference
    state["config"] = json.dumps(saved)
    torch.save(state, run / "train_state.pt")
    with pytest.raises(ModelLoadError, match="different config"):
        resume_recipe(run, progress=False, log=lambda *a, **k: None)
