"""Bad-input corpus: every file a user can get wrong, run through the real CLI.

Each case in ``CASES`` builds its bad input under ``tmp_path`` (nothing is checked in) and returns
the argv for :func:`iterwego.apps.cli.main` plus the path the message must name. The shared test then
asserts the CLI's error policy: a non-zero exit, exactly one line on stderr that names the file
(and the story or line where the case has one) and says what is wrong, and no traceback.

Inputs that look odd but are valid (CMYK, 16-bit, palette, alpha, animated GIF; 14-item stories;
empty or 10,000-word sentences; a one-item story in the training data) must work instead.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LONG_SENTENCE
from iterwego.apps.cli import main

# what the failing `train` cases pass (they stop at the bad input)
TRAIN_ARGS = [
    "--quiet",
    "--set",
    "train.unimodal_epochs=1",
    "--set",
    "train.iterative_epochs=1",
    "--set",
    "aligner.epochs=1",
    "--set",
    "encoder.image_size=32",
    "--set",
    "train.num_threads=1",
]


@pytest.fixture
def trained(trained_run) -> dict:
    """The session's shared run (tests/conftest.py); its train split has a one-item story and odd sentences."""
    return {"data": trained_run.data, "run": trained_run.run, "stdout": trained_run.stdout}


@dataclass
class Ctx:
    """What a case builder gets: a scratch directory and the trained run with its data."""

    tmp: Path
    run: Path
    data: Path

    def copy_data(self) -> Path:
        d = self.tmp / "data"
        shutil.copytree(self.data, d)
        return d

    def copy_run(self) -> Path:
        r = self.tmp / "run"
        shutil.copytree(self.run, r, ignore=shutil.ignore_patterns("train_state.pt", "tb"))
        return r

    def images(self, k: int = 2) -> list[str]:
        return [str(p) for p in sorted((self.data / "images" / "test").glob("*.png"))[:k]]

    def sentences(self, k: int = 2) -> list[str]:
        return [f"sentence number {i} ." for i in range(k)]


def _vist_edit(path: Path, fn: Callable[[list[dict]], None]) -> str:
    """Apply ``fn`` to the annotation records of a VIST file; returns the first story id."""
    doc = json.loads(path.read_text())
    recs = [a[0] for a in doc["annotations"]]
    fn(recs)
    path.write_text(json.dumps({**doc, "annotations": [[r] for r in recs]}))
    return recs[0]["story_id"]


def _first_story(recs: list[dict]) -> list[dict]:
    sid = recs[0]["story_id"]
    return sorted((r for r in recs if r["story_id"] == sid), key=lambda r: r["worker_arranged_photo_order"])


def _jpeg_bytes(size: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90
    )
    return buf.getvalue()


# --------------------------------------------------------------------------- the table
# case id -> (builder(ctx) -> (argv, path the message must name), substrings the one line must contain, post-check)
CASES: dict[str, tuple[Callable, tuple[str, ...], Callable | None]] = {}


def case(cid: str, *expect: str, post: Callable | None = None):
    def register(fn):
        assert cid not in CASES
        CASES[cid] = (fn, expect, post)
        return fn

    return register


def _order_images(ctx: Ctx, bad: Path) -> tuple[list[str], Path]:
    return ["order", "--run", str(ctx.run), "--images", str(bad), *ctx.images()], bad


# images ------------------------------------------------------------------
@case("image-missing", "file not found")
def _(ctx):
    return _order_images(ctx, ctx.tmp / "nope.jpg")


@case("image-zero-bytes", "empty file (0 bytes)")
def _(ctx):
    (ctx.tmp / "zero.jpg").write_bytes(b"")
    return _order_images(ctx, ctx.tmp / "zero.jpg")


@case("image-truncated-jpeg", "truncated")
def _(ctx):
    b = _jpeg_bytes()
    (ctx.tmp / "cut.jpg").write_bytes(b[: len(b) * 6 // 10])
    return _order_images(ctx, ctx.tmp / "cut.jpg")


@case("image-text-named-jpg", "not an image file")
def _(ctx):
    (ctx.tmp / "notes.jpg").write_text("these are my holiday notes, not a photo\n")
    return _order_images(ctx, ctx.tmp / "notes.jpg")


@case("image-decompression-bomb", "decompression-bomb limit")
def _(ctx):
    # A 1-bit PNG of ~1.25x Pillow's pixel limit compresses to a few kB: a real file, no monkeypatching.
    side = int((Image.MAX_IMAGE_PIXELS * 1.25) ** 0.5) + 1
    Image.new("1", (side, side)).save(ctx.tmp / "bomb.png")
    assert (ctx.tmp / "bomb.png").stat().st_size < 1_000_000
    return _order_images(ctx, ctx.tmp / "bomb.png")


@case("image-is-a-directory", "is a directory")
def _(ctx):
    (ctx.tmp / "album.jpg").mkdir()
    return _order_images(ctx, ctx.tmp / "album.jpg")


@case("train-data-image-missing", "story", "no image for photo")
def _(ctx):
    d = ctx.copy_data()
    sid = _vist_edit(d / "train.story-in-sequence.json", lambda recs: None)
    doc = json.loads((d / "train.story-in-sequence.json").read_text())
    pid = next(a[0]["photo_flickr_id"] for a in doc["annotations"] if a[0]["story_id"] == sid)
    (d / "images" / "train" / f"{pid}.png").unlink()
    return ["train", "--data", str(d), "--out", str(ctx.tmp / "out"), *TRAIN_ARGS], d / "train.story-in-sequence.json"


@case("evaluate-data-image-truncated", "story", "truncated")
def _(ctx):
    d = ctx.copy_data()
    doc = json.loads((d / "test.story-in-sequence.json").read_text())
    pid = doc["annotations"][0][0]["photo_flickr_id"]
    img = d / "images" / "test" / f"{pid}.png"
    b = img.read_bytes()
    img.write_bytes(b[: len(b) * 6 // 10])
    return ["evaluate", "--run", str(ctx.run), "--data", str(d), "--quiet"], d / "test.story-in-sequence.json"


# VIST JSON ------------------------------------------------------------------
@case("train-malformed-json", "line 3", "malformed JSON")
def _(ctx):
    d = ctx.copy_data()
    (d / "train.story-in-sequence.json").write_text('{\n "annotations": [\n  [{"story_id": "1",,}]\n ]\n}\n')
    return ["train", "--data", str(d), "--out", str(ctx.tmp / "out"), *TRAIN_ARGS], d / "train.story-in-sequence.json"


@case("evaluate-non-utf8", "not valid UTF-8", "0xff")
def _(ctx):
    d = ctx.copy_data()
    p = d / "test.story-in-sequence.json"
    p.write_bytes(p.read_bytes().replace(b'"text": "', b'"text": "\xff', 1))
    return ["evaluate", "--run", str(ctx.run), "--data", str(d), "--quiet"], p


@case("train-missing-key", "story", "missing key 'worker_arranged_photo_order'")
def _(ctx):
    d = ctx.copy_data()
    _vist_edit(d / "train.story-in-sequence.json", lambda recs: recs[0].pop("worker_arranged_photo_order"))
    return ["train", "--data", str(d), "--out", str(ctx.tmp / "out"), *TRAIN_ARGS], d / "train.story-in-sequence.json"


@case("evaluate-duplicate-position", "story", "duplicate worker_arranged_photo_order 0")
def _(ctx):
    d = ctx.copy_data()

    def dup(recs):
        _first_story(recs)[1]["worker_arranged_photo_order"] = 0

    _vist_edit(d / "test.story-in-sequence.json", dup)
    return ["evaluate", "--run", str(ctx.run), "--data", str(d), "--quiet"], d / "test.story-in-sequence.json"


@case("evaluate-missing-position", "story", "are not 0..")
def _(ctx):
    d = ctx.copy_data()

    def gap(recs):
        _first_story(recs)[-1]["worker_arranged_photo_order"] += 5

    _vist_edit(d / "test.story-in-sequence.json", gap)
    return ["evaluate", "--run", str(ctx.run), "--data", str(d), "--quiet"], d / "test.story-in-sequence.json"


@case("train-data-dir-missing", "data directory not found")
def _(ctx):
    return [
        "train",
        "--data",
        str(ctx.tmp / "no-data"),
        "--out",
        str(ctx.tmp / "out"),
        *TRAIN_ARGS,
    ], ctx.tmp / "no-data"


@case("evaluate-split-missing", "split 'dev' not found")
def _(ctx):
    return [
        "evaluate",
        "--run",
        str(ctx.run),
        "--data",
        str(ctx.data),
        "--split",
        "dev",
        "--quiet",
    ], ctx.data / "dev.story-in-sequence.json"


# JSONL ------------------------------------------------------------------------
def _jsonl(ctx: Ctx, text: str | bytes) -> tuple[list[str], Path]:
    p = ctx.tmp / "album.jsonl"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["order", "--run", str(ctx.run), "--jsonl", str(p)], p


@case("jsonl-malformed", "line 2", "malformed JSON")
def _(ctx):
    return _jsonl(ctx, '{"id": 1, "sentences": ["a .", "b ."]}\n{"id": 2, "sentences": ["a .", "b ."]\n')


@case("jsonl-non-utf8", "line 2", "not valid UTF-8")
def _(ctx):
    return _jsonl(ctx, b'{"id": 1, "sentences": ["a .", "b ."]}\n{"id": 2, "sentences": ["caf\xe9 .", "b ."]}\n')


@case("jsonl-missing-id", "line 1", "missing key 'id'")
def _(ctx):
    return _jsonl(ctx, '{"sentences": ["a .", "b ."]}\n')


@case("jsonl-no-items-key", "line 1", "story 7", "needs 'images' or 'sentences'")
def _(ctx):
    return _jsonl(ctx, '{"id": 7, "caption": "a day out"}\n')


@case("jsonl-duplicate-id", "line 2", "duplicate id")
def _(ctx):
    return _jsonl(ctx, '{"id": "a", "sentences": ["a .", "b ."]}\n{"id": "a", "sentences": ["c .", "d ."]}\n')


@case("jsonl-one-item-story", "line 2", "story solo", "at least 2 items")
def _(ctx):
    return _jsonl(ctx, '{"id": 1, "sentences": ["a .", "b ."]}\n{"id": "solo", "sentences": ["only one ."]}\n')


@case("jsonl-unequal-counts", "line 1", "story 1", "2 images but 3 sentences")
def _(ctx):
    return _jsonl(ctx, json.dumps({"id": 1, "images": ctx.images(2), "sentences": ctx.sentences(3)}) + "\n")


@case("jsonl-image-missing", "line 1", "story 1", "gone.png", "file not found")
def _(ctx):
    return _jsonl(ctx, json.dumps({"id": 1, "images": ["gone.png", *ctx.images(1)]}) + "\n")


@case("train-jsonl-unequal-counts", "line 2", "story b", "1 images but 2 sentences")
def _(ctx):
    d = ctx.tmp / "jdata"
    d.mkdir()
    img = ctx.images(2)
    lines = [
        {"id": "a", "images": img, "sentences": ctx.sentences(2)},
        {"id": "b", "images": img[:1], "sentences": ctx.sentences(2)},
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "val.jsonl").write_text(json.dumps(lines[0]) + "\n")
    return [
        "train",
        "--data",
        str(d),
        "--format",
        "jsonl",
        "--out",
        str(ctx.tmp / "out"),
        *TRAIN_ARGS,
    ], d / "train.jsonl"


# runs and checkpoints -----------------------------------------------------------
@case("run-dir-missing", "run directory not found")
def _(ctx):
    return ["order", "--run", str(ctx.tmp / "no-run"), "--sentences", *ctx.sentences()], ctx.tmp / "no-run"


@case("run-missing-weights", "missing from the run directory")
def _(ctx):
    r = ctx.copy_run()
    (r / "model.safetensors").unlink()
    return ["evaluate", "--run", str(r), "--data", str(ctx.data), "--quiet"], r / "model.safetensors"


@case("run-corrupt-safetensors", "corrupt or unreadable weights")
def _(ctx):
    r = ctx.copy_run()
    b = (r / "model.safetensors").read_bytes()
    (r / "model.safetensors").write_bytes(b[: len(b) // 2])  # an interrupted copy
    return ["order", "--run", str(r), "--sentences", *ctx.sentences()], r / "model.safetensors"


@case("run-config-other-version", "config version 99 is not supported")
def _(ctx):
    r = ctx.copy_run()
    cfg = json.loads((r / "config.json").read_text())
    (r / "config.json").write_text(json.dumps({**cfg, "version": 99}))
    return ["order", "--run", str(r), "--sentences", *ctx.sentences()], r / "config.json"


@case("run-config-unknown-field", "unknown keys ['dropout_schedule']")
def _(ctx):
    r = ctx.copy_run()
    cfg = json.loads((r / "config.json").read_text())
    cfg["orderer"]["dropout_schedule"] = "linear"
    (r / "config.json").write_text(json.dumps(cfg))
    return ["evaluate", "--run", str(r), "--data", str(ctx.data), "--quiet"], r / "config.json"


@case("run-meta-not-json", "not valid JSON")
def _(ctx):
    r = ctx.copy_run()
    (r / "meta.json").write_text('{"chosen_rounds": ')
    return ["order", "--run", str(r), "--sentences", *ctx.sentences()], r


@case("resume-corrupt-train-state", "unreadable training state")
def _(ctx):
    r = ctx.tmp / "run"
    shutil.copytree(ctx.run, r, ignore=shutil.ignore_patterns("tb"))
    (r / "train_state.pt").write_bytes(b"PK\x03\x04 half a zip")
    return ["train", "--resume", str(r), "--quiet"], r / "train_state.pt"


@case("train-unknown-override", "train has no field 'epochz'")
def _(ctx):
    return ["train", "--data", str(ctx.data), "--out", str(ctx.tmp / "out"), "--set", "train.epochz=3"], "train.epochz"


@case("train-override-wrong-type", "train.lr expects a number")
def _(ctx):
    return ["train", "--data", str(ctx.data), "--out", str(ctx.tmp / "out"), "--set", "train.lr=fast"], "train.lr"


# import-official ------------------------------------------------------------------
class _Hostile:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _marker_absent(ctx: Ctx) -> None:
    assert not (ctx.tmp / "pwned").exists(), "the hostile pickle was executed"
    assert not (ctx.tmp / "imported").exists() or not any((ctx.tmp / "imported").iterdir())


@case("import-hostile-pickle", "refused to load", "never unpickles arbitrary objects", post=_marker_absent)
def _(ctx):
    p = ctx.tmp / "natorder.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Hostile(ctx.tmp / "pwned"), "best_score": 0.5}, p)
    return ["import-official", str(p), "--out", str(ctx.tmp / "imported")], p


@case("import-text-file", "refused to load")
def _(ctx):
    p = ctx.tmp / "checkpoint.pt"
    p.write_text("<html>404 not found</html>\n")  # what a failed download often leaves
    return ["import-official", str(p), "--out", str(ctx.tmp / "imported")], p


@case("import-no-model-key", "expected a dict with a 'model' state dict")
def _(ctx):
    p = ctx.tmp / "optimizer.pt"
    torch.save({"optimizer": {"lr": torch.tensor(1e-3)}}, p)
    return ["import-official", str(p), "--out", str(ctx.tmp / "imported")], p


@case("import-missing-file", "checkpoint file not found")
def _(ctx):
    return ["import-official", str(ctx.tmp / "absent.pt"), "--out", str(ctx.tmp / "imported")], ctx.tmp / "absent.pt"


def _run_case(cid: str, ctx: Ctx, capsys) -> tuple[int, str, str]:
    build, _, _ = CASES[cid]
    argv, _ = build(ctx)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("cid", list(CASES))
def test_bad_input_is_one_clear_line(cid, trained, tmp_path, capsys):
    build, expect, post = CASES[cid]
    ctx = Ctx(tmp_path, trained["run"], trained["data"])
    argv, named = build(ctx)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error policy is about the error line, not library warnings
        rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"iterwego {argv[0]}: error: "), line
    assert "Traceback" not in err
    assert str(named) in line, f"the message does not name {named}: {line}"
    for s in expect:
        assert s in line, f"{s!r} not in {line!r}"
    if post is not None:
        post(ctx)


def _cli(*args: str) -> tuple[list[str], dict]:
    return [sys.executable, "-m", "iterwego", *args], {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _hostile_pickle_cli(data: Path, out: Path) -> tuple[list[str], dict]:
    out.mkdir(parents=True)
    argv, _ = CASES["import-hostile-pickle"][0](Ctx(out, out / "no-run", data))
    return _cli(*argv)


@pytest.mark.early_start("hostile-pickle", _hostile_pickle_cli)  # a fresh interpreter, started with the session
def test_hostile_pickle_in_a_real_process(early_runs):
    """The real exit path: a fresh interpreter, exit status 2, one line, and nothing executed."""
    run = early_runs["hostile-pickle"]
    r = run.wait()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run.out / "natorder.pt") in lines[0] and "refused to load" in lines[0], r.stderr
    _marker_absent(Ctx(run.out, run.out / "no-run", run.out))


def _debug_cli(data: Path, out: Path) -> tuple[list[str], dict]:
    return _cli("--debug", "order", "--run", str(out / "no-run"), "--sentences", "a .", "b .")


@pytest.mark.early_start("debug-traceback", _debug_cli)
def test_debug_shows_the_traceback(early_runs):
    r = early_runs["debug-traceback"].wait()
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ModelLoadError" in r.stderr and "no-run" in r.stderr


# --------------------------------------------------------------------------- environment
def test_disk_full_while_saving_keeps_the_previous_run(trained, tmp_path, monkeypatch, capsys):
    """ENOSPC while `train --resume` saves the weights: one line, old files byte-identical and loadable, no temp."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file is being synced")
    from iterwego.model import load_run

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("tb"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if ".model.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--quiet"])  # a finished run: resuming goes straight to saving
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(run / "model.safetensors") in err[0] and "No space left on device" in err[0] and "unchanged" in err[0]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    for name in ("model.safetensors", "config.json", "meta.json", "train_state.pt"):
        assert (run / name).read_bytes() == before[name], name
    monkeypatch.undo()
    model, meta = load_run(run)
    assert meta["chosen_rounds"] == json.loads(before["meta.json"])["chosen_rounds"]
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == "done"


def test_unwritable_cache_directory_warns_once_and_still_trains(trained, tmp_path):
    """A feature cache that cannot be created: one CacheWarning, and the features are the uncached ones."""
    from iterwego.config import Config
    from iterwego.data.cache import CacheWarning, FeatureCache
    from iterwego.data.features import build_features
    from iterwego.training.recipe import TrainRecipe

    if os.geteuid() == 0:  # root ignores permission bits: put the cache under a regular file instead
        (tmp_path / "ro").write_text("not a directory")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
    cache = FeatureCache(tmp_path / "ro" / "cache")
    args = json.loads((trained["run"] / "train_args.json").read_text())
    recipe = TrainRecipe(
        Config.from_dict(args["config"]),
        trained["data"],
        tmp_path / "out",
        progress=False,
        log=lambda *a: None,
        cache=cache,
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recipe.setup()
        mine = [w for w in caught if issubclass(w.category, CacheWarning)]
        assert len(mine) == 1 and "cannot write" in str(mine[0].message), [str(w.message) for w in caught]
        stories = {"train": recipe.train_stories, "val": recipe.val_stories}
        _, plain = build_features(recipe.model.encoders(), stories, dtype=recipe.cfg.encoder.feature_dtype)
        for k in plain:
            assert torch.equal(plain[k], recipe.feats[k].to_tensor()), k
    finally:
        recipe.cleanup()


# --------------------------------------------------------------------------- odd but valid
def test_training_data_edge_cases_are_accepted(trained):
    """A one-item story (no pairs: it adds nothing to the loss), an empty sentence and a 10,000-word one."""
    assert "1 sentence(s) longer than 40 tokens were truncated" in trained["stdout"]
    meta = json.loads((trained["run"] / "meta.json").read_text())
    assert meta["truncated_sentences"] == 1
    for e in map(json.loads, (trained["run"] / "log.jsonl").read_text().splitlines()):
        assert e["epoch"] < 0 or np.isfinite(e["loss"]), e


def _odd_images(d: Path) -> list[Path]:
    d.mkdir()
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = {
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, "JPEG"),
        "grey16.png": lambda p: Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p),
        "alpha.png": lambda p: Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (30, 40), dtype=np.uint8)])).save(
            p
        ),
        "animated.gif": lambda p: Image.fromarray(rgb).save(
            p, save_all=True, append_images=[Image.fromarray(255 - rgb)], duration=100, loop=0
        ),
    }
    for name, save in out.items():
        save(d / name)
    with Image.open(d / "grey16.png") as im:
        assert im.mode.startswith("I")  # really 16-bit, not quietly 8-bit
    with Image.open(d / "animated.gif") as im:
        assert im.n_frames == 2
    return [d / n for n in out]


def test_every_image_mode_orders(trained, tmp_path, capsys):
    imgs = _odd_images(tmp_path / "odd")
    js = tmp_path / "o.json"
    rc = main(["order", "--run", str(trained["run"]), "--images", *map(str, imgs), "--json", str(js)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(js.read_text())
    assert sorted(res["image_order"]) == list(range(len(imgs)))
    for p in imgs:
        assert p.name in cap.out


def test_order_fourteen_items_falls_back_to_beam_and_says_so(trained, tmp_path, capsys):
    js = tmp_path / "o.json"
    rc = main(
        [
            "order",
            "--run",
            str(trained["run"]),
            "--sentences",
            *[f"step {k} of the day ." for k in range(14)],
            "--json",
            str(js),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "beam decoder" in out.splitlines()[0]
    res = json.loads(js.read_text())
    assert sorted(res["sentence_order"]) == list(range(14)) and "beam" in res["note"]


def test_evaluate_fourteen_item_story_falls_back_to_beam_and_says_so(trained, tmp_path, capsys):
    d = tmp_path / "long"
    (d / "images" / "test").mkdir(parents=True)
    pngs = sorted((trained["data"] / "images" / "train").glob("*.png"))[:14]
    for p in pngs:
        shutil.copy(p, d / "images" / "test" / p.name)
    anns = [
        [{"story_id": "long", "photo_flickr_id": p.stem, "worker_arranged_photo_order": k, "text": f"step {k} ."}]
        for k, p in enumerate(pngs)
    ]
    (d / "test.story-in-sequence.json").write_text(json.dumps({"annotations": anns}))
    js = tmp_path / "m.json"
    rc = main(["evaluate", "--run", str(trained["run"]), "--data", str(d), "--quiet", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "longer than 12 items used the beam decoder" in out
    fused = json.loads(js.read_text())["fused"]  # one 14-item story: all or nothing, and a whole number of items
    # a float64 ratio of counts times its count: whole up to ~1e-15 on any CPU
    assert fused["pmr"] in (0.0, 1.0) and fused["acc"] * 14 == pytest.approx(round(fused["acc"] * 14), abs=1e-9)


def test_order_empty_and_very_long_sentences(trained, tmp_path, capsys):
    js = tmp_path / "o.json"
    rc = main(
        ["order", "--run", str(trained["run"]), "--sentences", "", LONG_SENTENCE, "we went home .", "--json", str(js)]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(js.read_text())
    assert sorted(res["sentence_order"]) == [0, 1, 2]
    assert "1 sentence(s) longer than 40 tokens were truncated" in res["note"]
    assert "truncated" in cap.out.splitlines()[0]
    # unequal image/sentence counts in `order` are allowed (each modality alone): see test_resume_order.py
