"""The benchmark script runs end to end on the tiny preset and prints its table (off by default: -m benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.benchmark
def test_bench_tiny_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--stories",
            "4",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for needle in (
        "inference, 1 guided round",
        "train step, image phase",
        "train step, text phase",
        "backbones once per item",
        "cache hit",
        "floor: 1 batched backbone forward",
        "n=50",
        "exact decoder",
        "CLIP preprocessing",
        "check ours vs naive",
    ):
        assert needle in text, f"missing {needle!r} in:\n{text}"
    res = json.loads(out.read_text())
    s = res["summary"]
    assert all(s[k]["ours_ms"] > 0 and s[k]["naive_ms"] > 0 for k in ("inference", "train_image", "train_text"))
    # the batched path and the naive one compute the same numbers: a benchmark's sanity check, kept loose. What
    # differs is float32 rounding of the orderer and guidance in other shapes (a few ulps at the logits' scale,
    # ~1e-5; test_model and test_forward budget it exactly); 1e-3 is far above that on any CPU and far below a
    # skipped guidance round (O(1) moves in the selected logits)
    assert res["check"]["max_abs_diff_guided_logits"] < 1e-3
    assert max(res["check"]["abs_diff_phase_loss"].values()) < 1e-4
    assert res["clip_preprocessing"]["max_abs_diff"] < 1e-3
    assert set(res["lengths"]) == {"5", "10", "20", "50"} and set(res["exact_decoder_ms"]) == {"8", "10", "12"}


@pytest.mark.benchmark
def test_presets_benchmark_prints_the_paper_against_paper_plus_table(tmp_path):
    """benchmarks/presets.py end to end on a small dataset with one short training per preset."""
    out = tmp_path / "presets.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    short = ["train.unimodal_epochs=1", "train.iterative_epochs=2", "aligner.epochs=1", "fusion.epochs=1"]
    argv = [str(BENCH.with_name("presets.py")), "--work", str(tmp_path / "w"), "--stories", "60", "--seeds", "0"]
    argv += [x for s in short for x in ("--set", s)] + ["--json", str(out)]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in ("paper    tsort *|", "paper+   exact *|", "gain of paper+ over paper", "held fixed in both presets"):
        assert needle in proc.stdout, f"missing {needle!r} in:\n{proc.stdout}"
    res = json.loads(out.read_text())
    assert set(res["gain"]) == {"image", "text", "fused"} and res["extra_overrides"] == short
    for name in ("paper", "paper+"):
        cfg = json.loads((tmp_path / "w" / f"{name}-seed0" / "config.json").read_text())
        assert cfg["preset"] == name and cfg["encoder"]["image"] == "cnn" and cfg["aligner"]["kind"] == "learned"


SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.benchmark
def test_scale_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "scale.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(SCALE), "--sizes", "16", "32", "--val", "8", "--test", "4", "--threads", "1"]
    proc = subprocess.run(
        [*cmd, "--json", str(out), "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "store" in proc.stdout and "peak RSS" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["stories"] for r in res["results"]] == [16, 32]
    for r in res["results"]:
        assert r["peak_rss_mib"] > 0 and r["store_bytes"] > 0 and r["features"]["wall_s"] > 0
        assert set(r["stages"]) == {"unimodal-image", "unimodal-text", "aligner", "iterative"}
    # every sentence and every image distinct: nothing for the store to deduplicate
    doc = json.loads((tmp_path / "w" / "pool" / "train.story-in-sequence.json").read_text())
    texts = [a[0]["text"] for a in doc["annotations"]]
    assert len(set(texts)) == len(texts) == 32 * 5
    pixels = {p.read_bytes() for p in (tmp_path / "w" / "pool" / "images" / "train").iterdir()}
    assert len(pixels) == 32 * 5


def test_fusion_benchmark_evaluates_every_variant_of_a_trained_run(trained_run, tmp_path):
    """benchmarks/fusion.py on the session's run (as one family's seed, narrate 0): every variant, PMR per column
    on both splits, bounds, and the printed mean ± spread table."""
    work = tmp_path / "work" / "tank-n0-s0"
    work.mkdir(parents=True)
    (work / "run").symlink_to(trained_run.run)
    (work / "data").symlink_to(trained_run.data)
    out = tmp_path / "fusion.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [str(BENCH.with_name("fusion.py")), "--work", str(work.parent), "--families", "tank", "--seeds", "0"]
    argv += ["--narrate", "0", "--variants", "0.2", "fused orderer", "carried", "decoded", "plus sum 1"]
    md = tmp_path / "fusion.md"
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out), "--markdown", str(md)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val split: PMR, mean over seeds (spread: max - min)" in proc.stdout
    runs = json.loads(out.read_text())["results"]["tank/0"]
    table = runs["0"]
    assert set(table) == {"0.2", "fused orderer", "carried", "decoded", "plus sum 1"}
    columns = ("unimodal img", "unimodal txt", "guided img", "guided txt", "fused img", "fused txt")
    for row in table.values():
        for split in ("val", "test"):
            assert set(row[split]["pmr"]) == set(columns) and all(0.0 <= v <= 1.0 for v in row[split]["pmr"].values())
            c = row[split]["ceilings"]
            assert c["fused_image"] == c["fused_text"] == c["fused"]  # no narrating sentences: the fusion ceiling
    # the variants share the trained orderers: guided rows never change, and 0.2 has no position terms
    assert len({(r["test"]["pmr"]["guided img"], r["test"]["pmr"]["guided txt"]) for r in table.values()}) == 1
    assert table["0.2"]["val"]["pmr"]["unimodal img"] == table["fused orderer"]["val"]["pmr"]["unimodal img"]
    assert table["carried"]["test"]["pmr"]["fused img"] == table["decoded"]["test"]["pmr"]["fused img"]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("tank") and " carried " in line)
    assert f"{100 * table['carried']['val']['pmr']['fused img']:7.1f} ± 0.0" in row  # one seed: no spread
    assert f"| tank | 0 | carried | {100 * table['carried']['val']['alignment']:.1f} |" in md.read_text()


def test_heads_refit_retrains_only_the_last_stage(trained_run, tmp_path):
    """benchmarks/heads_refit.py: the orderers and aligner of the run, the heads trained again (here an ensemble
    of 2 for one epoch); the unimodal orders' pair terms and the guided rounds are those of the run."""
    work = tmp_path / "demo"
    work.mkdir()
    (work / "run").symlink_to(trained_run.run)
    (work / "data").symlink_to(trained_run.data)
    out = tmp_path / "refit.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [str(BENCH.with_name("heads_refit.py")), str(work), "--head-seeds", "0", "--json", str(out)]
    argv += ["--set", "fusion.ensemble=2", "--set", "fusion.epochs=1"]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (got,) = json.loads(out.read_text())
    assert got["set"] == ["fusion.ensemble=2", "fusion.epochs=1"] and got["heads_cpu_s"] > 0
    assert set(got["test"]) == {"unimodal img", "unimodal txt", "fused img", "fused txt"}
    assert all(0.0 <= v <= 1.0 for v in got["test"].values()) and "head seed 0: test" in proc.stdout
