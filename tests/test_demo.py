"""`iterwego demo`: fast wiring check by default; the full acceptance run behind the `slow` marker."""

from __future__ import annotations

import json

import pytest

from iterwego.apps.cli import main

FAST = [
    "--set",
    "train.unimodal_epochs=1",
    "--set",
    "train.iterative_epochs=1",
    "--set",
    "aligner.epochs=1",
    "--set",
    "train.num_threads=1",
]


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--stories", "30", "--quiet", *FAST]) == 0
    out = capsys.readouterr().out
    assert "unimodal (round 0)" in out and "fused decoding" in out and "ceilings" in out
    # half the demo's photos carry EXIF times: labelled rows use them, the rows above ignore them
    assert "guided + capture times (val-chosen: img" in out and "fused decoding + capture times" in out
    rep = json.loads((tmp_path / "test_metrics.json").read_text())
    assert set(rep) == {"image", "text", "fused", "alignment_accuracy", "capture_time"}
    assert 0.2 < rep["capture_time"]["placed_by_time"] < 0.6
    assert (tmp_path / "report.html").is_file() and (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_fills_and_reuses_the_feature_cache(tmp_path, monkeypatch):
    from iterwego import encoders

    cache = tmp_path / "cache"
    args = ["demo", "--out", str(tmp_path / "a"), "--stories", "20", "--quiet", "--cache-dir", str(cache), *FAST]
    assert main(args) == 0
    assert any(cache.rglob("*.safetensors"))
    calls = []
    orig = encoders.Encoder.featurize
    monkeypatch.setattr(
        encoders.Encoder, "featurize", lambda self, items, **kw: calls.append(len(items)) or orig(self, items, **kw)
    )
    args[2] = str(tmp_path / "b")
    assert main(args) == 0  # same seed, same data: every backbone feature comes from the cache
    assert calls == []


@pytest.mark.slow
def test_demo_meets_the_targets(tmp_path):
    """The default demo: guided beats unimodal by 10 points in both modalities; fused >= 80% of its ceiling."""
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    rep = json.loads((tmp_path / "test_metrics.json").read_text())
    ceil = json.loads((tmp_path / "data" / "ceilings.json").read_text())["test"]
    for m in ("image", "text"):
        assert rep[m]["guided"]["pmr"] >= rep[m]["unimodal"]["pmr"] + 0.10
    assert rep["fused"]["pmr"] >= 0.8 * ceil["fused_pmr"]
    assert (
        rep["image"]["unimodal"]["pmr"] >= 0.8 * ceil["image_pmr"]
        and rep["text"]["unimodal"]["pmr"] >= 0.8 * ceil["text_pmr"]
    )
