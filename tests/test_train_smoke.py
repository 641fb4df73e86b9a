"""End to end: synthesise stories, `iterwego train`, `iterwego evaluate --json` (the session's shared run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_same_run, evaluate_json
from iterwego.apps.cli import main
from iterwego.data.readers import load_split
from iterwego.metrics import order_metrics
from iterwego.model import load_run

METRICS = {"acc", "pmr", "tau"}


def test_run_directory_layout(trained_run):
    run = trained_run.run
    for name in ("config.json", "model.safetensors", "meta.json", "log.jsonl", "train_args.json", "train_state.pt"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["unimodal_epochs"] == 2 and cfg["encoder"]["image_size"] == 32
    assert cfg["orderer"]["d_model"] == 32  # --set overrides reach the saved config
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == "done"


def test_metrics_json_is_the_metrics_of_the_predicted_test_orders(trained_run):
    """Every number in `evaluate --json` is order_metrics of the orders the run predicts on the test split.

    The predictions are recomputed here with the loaded model and the evaluator (rounds 0..R, fused), so a
    report that mixed up rounds, modalities, splits or the chosen round would not match.
    """
    from iterwego.data.features import build_features
    from iterwego.training.evaluator import Evaluator

    report = trained_run.metrics
    meta = json.loads((trained_run.run / "meta.json").read_text())
    assert set(report) == {
        *("image", "text", "fused", "fused_text", "fusion", "position_terms", "alignment_accuracy"),
        *("ceilings", "fused_ceiling_share"),  # synthetic data
    }
    assert report["fusion"] == "orderer" and report["position_terms"] is True
    model, _ = load_run(trained_run.run)
    stories = load_split(trained_run.data, "test")
    sets, feats = build_features(model.encoders(), {"test": stories})
    res = Evaluator(sets["test"], feats, seed=model.cfg.train.seed + 2)(model, keep_orders=True)
    gold = [list(range(len(s.items))) for s in stories]
    pick = lambda m: {k: m[k] for k in METRICS}  # noqa: E731
    for mod in ("image", "text"):
        r = report[mod]
        assert set(r) == {"unimodal", "rounds", "chosen_round", "guided"}
        assert len(r["rounds"]) == 4  # rounds 0..guidance.max_rounds (3)
        want = [pick(order_metrics(res.orders[f"{mod}/round{k}"], gold)) for k in range(4)]
        assert r["rounds"] == want  # the same arithmetic on the same orders: equal, not close
        assert r["unimodal"] == want[0]
        assert r["chosen_round"] == meta["chosen_rounds"][mod]  # chosen on validation at training time
        assert r["guided"] == want[r["chosen_round"]]
    assert report["fused"] == pick(order_metrics(res.orders["fused/image"], gold))
    assert report["fused_text"] == pick(order_metrics(res.orders["fused/text"], gold))  # the fused order's sentences
    share = {m: report[k]["pmr"] / report["ceilings"]["fused"] for m, k in (("image", "fused"), ("text", "fused_text"))}
    assert report["fused_ceiling_share"] == share  # the same division on one machine: equal
    # pmr counts whole stories and acc whole items of the test split (a float64 ratio times its count: whole up to
    # ~1e-15, on any CPU; abs=1e-9 still tells a whole number from one off by a fraction of an item)
    n_items = sum(len(s.items) for s in stories)
    for m in [report["fused"], *report["image"]["rounds"], *report["text"]["rounds"]]:
        assert m["pmr"] * len(stories) == pytest.approx(round(m["pmr"] * len(stories)), abs=1e-9)
        assert m["acc"] * n_items == pytest.approx(round(m["acc"] * n_items), abs=1e-9)
    assert report["alignment_accuracy"] == res.alignment_accuracy


def test_log_has_entries_for_every_stage(trained_run):
    lines = (trained_run.run / "log.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    by_stage: dict[str, list[dict]] = {}
    for e in entries:
        by_stage.setdefault(e["stage"], []).append(e)
    assert [e["epoch"] for e in by_stage["unimodal-image"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["unimodal-text"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["aligner"]] == [0, 1]
    assert [e["epoch"] for e in by_stage["iterative"]] == [-1, 0, 1]  # -1: validation before guided training
    assert [e["epoch"] for e in by_stage["heads"]] == [0, 1]  # rank heads and fused orderer, on frozen states
    assert set(by_stage) == {"unimodal-image", "unimodal-text", "aligner", "iterative", "heads"}
    for e in entries:
        if e["epoch"] >= 0:
            assert math.isfinite(e["loss"]) and e["loss"] > 0
        assert "val" in e
    for e in by_stage["unimodal-image"] + by_stage["unimodal-text"]:
        assert METRICS <= set(e["val"])
    # top-1 alignment accuracy on validation: a whole number of images out of all validation images
    n_val_images = sum(len(s.items) for s in load_split(trained_run.data, "val"))
    for e in by_stage["aligner"]:
        hits = e["val"]["alignment_accuracy"] * n_val_images  # float64 ratio of counts: whole up to ~1e-15
        assert hits == pytest.approx(round(hits), abs=1e-9)
    for e in by_stage["iterative"][1:]:
        # the logged numbers themselves: one float32 addition and halving apart (<= 1 ulp), rel 1e-6 is 8 ulps
        assert e["loss"] == pytest.approx((e["loss_image"] + e["loss_text"]) / 2)


def test_same_seed_twice_in_one_process_gives_an_identical_run(trained_run, tmp_path):
    """A second training in this process (after the shared one, and whatever ran before) repeats it bit for bit;
    tests/test_reliability.py checks the same across a fresh interpreter with another hash seed."""
    threads = torch.get_num_threads()
    try:
        run = tmp_path / "run"
        assert main(["train", "--data", str(trained_run.data), "--out", str(run), *trained_run.args]) == 0
        assert_same_run(trained_run.run, run)
        assert evaluate_json(run, trained_run.data, tmp_path / "m.json") == trained_run.metrics
    finally:
        torch.set_num_threads(threads)


def test_evaluate_missing_run_is_a_one_line_error(trained_run, tmp_path, capsys):
    rc = main(["evaluate", "--data", str(trained_run.data), "--run", str(tmp_path / "no-run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "no-run" in err and "Traceback" not in err


@pytest.mark.slow
def test_compile_and_bf16_autocast_train_and_reload(tmp_path):
    """train.compile (in-place Module.compile) and bf16 autocast run end to end; the run reloads with plain keys."""
    from iterwego.data.synth import SynthConfig, synthesize

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
        "--set",
        "fusion.epochs=1",
    ]
    assert main(args) == 0
    model, _ = load_run(tmp_path / "r")
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_authors_protocol_is_printed_beside_the_validation_chosen_result(trained_run, tmp_path, capsys):
    """`evaluate --authors-protocol` adds the authors' test-chosen tsort row; the validation-chosen result stays."""
    data, run = str(trained_run.data), str(trained_run.run)
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
    assert report == trained_run.metrics  # the flag changes nothing else
