"""End to end: synthesise stories, `iterwego train`, `iterwego evaluate --json`, twice with one seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from iterwego.apps.cli import main
from iterwego.data.synth import SynthConfig, synthesize

TRAIN_ARGS = [
    "--quiet",
    "--set", "train.unimodal_epochs=2",
    "--set", "train.iterative_epochs=1",
    "--set", "aligner.epochs=2",
    "--set", "encoder.image_size=32",
]  # fmt: skip
METRICS = {"acc", "pmr", "tau"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs trained from the same data and seed, each evaluated on the test split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend (and the run gets 5x slower)
    try:
        root = tmp_path_factory.mktemp("smoke")
        data = root / "data"
        synthesize(data, SynthConfig(stories=40, seed=1, image_size=32))
        out = {}
        for name in ("a", "b"):
            run, js = root / f"run-{name}", root / f"metrics-{name}.json"
            rc_train = main(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS])
            rc_eval = main(["evaluate", "--data", str(data), "--run", str(run), "--quiet", "--json", str(js)])
            out[name] = {"run": run, "json": js, "rc": (rc_train, rc_eval)}
        out["data"] = data
        yield out
    finally:
        torch.set_num_threads(threads)


def test_exit_codes(trained):
    assert trained["a"]["rc"] == (0, 0)
    assert trained["b"]["rc"] == (0, 0)


def test_run_directory_layout(trained):
    run = trained["a"]["run"]
    for name in ("config.json", "model.safetensors", "meta.json", "log.jsonl"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["unimodal_epochs"] == 2 and cfg["encoder"]["image_size"] == 32


def _check_metrics(m: dict) -> None:
    assert set(m) == METRICS
    assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["pmr"] <= 1.0
    assert math.isnan(m["tau"]) or -1.0 <= m["tau"] <= 1.0


def test_metrics_json_has_the_documented_shape(trained):
    report = json.loads(trained["a"]["json"].read_text())
    meta = json.loads((trained["a"]["run"] / "meta.json").read_text())
    assert set(report) == {"image", "text", "fused", "alignment_accuracy"}
    for mod in ("image", "text"):
        r = report[mod]
        assert set(r) == {"unimodal", "rounds", "chosen_round", "guided"}
        assert len(r["rounds"]) == 4  # rounds 0..guidance.max_rounds (3)
        for m in [r["unimodal"], r["guided"], *r["rounds"]]:
            _check_metrics(m)
        assert r["rounds"][0] == r["unimodal"]
        assert isinstance(r["chosen_round"], int) and 0 <= r["chosen_round"] < len(r["rounds"])
        assert r["guided"] == r["rounds"][r["chosen_round"]]
        assert r["chosen_round"] == meta["chosen_rounds"][mod]  # chosen on validation at training time
    _check_metrics(report["fused"])
    assert isinstance(report["alignment_accuracy"], float) and 0.0 <= report["alignment_accuracy"] <= 1.0


def test_log_has_entries_for_every_stage(trained):
    lines = (trained["a"]["run"] / "log.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    by_stage: dict[str, list[dict]] = {}
    for e in entries:
        by_stage.setdefault(e["stage"], []).append(e)
    assert [e["epoch"] for e in by_stage["unimodal-image"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["unimodal-text"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["aligner"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["iterative"]] == [-1, 0]  # -1: validation before guided training
    assert set(by_stage) == {"unimodal-image", "unimodal-text", "aligner", "iterative"}
    for e in entries:
        if e["epoch"] >= 0:
            assert math.isfinite(e["loss"]) and e["loss"] > 0
        assert "val" in e
    for e in by_stage["unimodal-image"] + by_stage["unimodal-text"]:
        assert METRICS <= set(e["val"])
    assert 0.0 <= by_stage["aligner"][0]["val"]["alignment_accuracy"] <= 1.0
    assert {"loss_image", "loss_text"} <= set(by_stage["iterative"][1])


def test_same_seed_gives_identical_metrics(trained):
    a, b = (json.loads(trained[k]["json"].read_text()) for k in ("a", "b"))
    assert a == b
    la, lb = ((trained[k]["run"] / "log.jsonl").read_text() for k in ("a", "b"))
    assert la == lb  # every loss and validation number, not just the final metrics


def test_evaluate_missing_run_is_a_one_line_error(trained, tmp_path, capsys):
    rc = main(["evaluate", "--data", str(trained["data"]), "--run", str(tmp_path / "no-run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "no-run" in err and "Traceback" not in err


@pytest.mark.slow
def test_compile_and_bf16_autocast_train_and_reload(tmp_path):
    """train.compile (in-place Module.compile) and bf16 autocast run end to end; the run reloads with plain keys."""
    from iterwego.data.synth import SynthConfig, synthesize
    from iterwego.model import load_run

    synthesize(tmp_path / "d", SynthConfig(stories=20, seed=2, image_size=32))
    args = [
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
        "--no-cache",
        "--set",
        "train.compile=true",
        "--set",
        "train.amp=bf16",
        "--set",
        "train.unimodal_epochs=1",
        "--set",
        "train.iterative_epochs=1",
        "--set",
        "aligner.epochs=1",
    ]
    assert main(args) == 0
    model, _ = load_run(tmp_path / "r")
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_authors_protocol_is_printed_beside_the_validation_chosen_result(trained, tmp_path, capsys):
    """`evaluate --authors-protocol` adds the authors' test-chosen tsort row; the validation-chosen result stays."""
    data, run = str(trained["data"]), str(trained["a"]["run"])
    base = ["evaluate", "--data", data, "--run", run, "--quiet", "--json"]
    assert main([*base, str(tmp_path / "a.json"), "--authors-protocol"]) == 0
    out = capsys.readouterr().out
    assert "guided (val-chosen" in out and "authors' protocol (test-chosen: img " in out
    assert "for comparison with their published numbers only" in out
    report = json.loads((tmp_path / "a.json").read_text())
    assert main([*base, str(tmp_path / "t.json"), "--decoder", "tsort"]) == 0
    tsort = json.loads((tmp_path / "t.json").read_text())
    authors = report.pop("authors_protocol")
    for mod in ("image", "text"):
        rounds = tsort[mod]["rounds"]
        best = max((1, 2, 3), key=lambda r: (rounds[r]["acc"], -r))  # the best test Acc, the first on ties
        assert authors[mod] == {"round": best, **rounds[best]}
    assert report == json.loads(trained["a"]["json"].read_text())  # the flag changes nothing else
