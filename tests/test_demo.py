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
    "--set",
    "fusion.epochs=1",
]


def test_demo_runs_end_to_end_small_and_fills_the_feature_cache(tmp_path, capsys, monkeypatch):
    """One small demo (synth -> train -> evaluate -> report) with a cache directory; a second CLI command on
    the same data then takes every backbone feature from that cache."""
    from iterwego import encoders

    cache = tmp_path / "cache"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--stories", "20", "--quiet", "--cache-dir", str(cache), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "unimodal (round 0)" in printed and "fused orderer" in printed and "ceilings" in printed
    assert "PMR / ceiling (%)" in printed and "decoded from pair and position terms" in printed
    # half the demo's photos carry EXIF times: labelled rows use them, the rows above ignore them
    assert "guided + capture times (val-chosen: img" in printed and "fused orderer + capture times" in printed
    rep = json.loads((out / "test_metrics.json").read_text())
    assert set(rep) == {
        *("image", "text", "fused", "fused_text", "fusion", "position_terms", "alignment_accuracy", "capture_time"),
        *("ceilings", "fused_ceiling_share"),  # synthetic data: the fused order's share of its ceiling, both sides
    }
    assert rep["fusion"] == "orderer" and rep["position_terms"] is True
    assert 0.2 < rep["capture_time"]["placed_by_time"] < 0.6
    assert (out / "report.html").is_file() and (out / "run" / "model.safetensors").is_file()
    assert any(cache.rglob("*.safetensors"))
    # the last table: the same test stories with half of the sentences narrating, beside the first
    assert "[4/4] the same run on the test split again, 50% of its sentences narrating" in printed
    table = printed[printed.index("[4/4]") :]
    weak = json.loads((out / "test_metrics_narrating.json").read_text())
    row = lambda r: f"{100 * r['pmr']:5.1f}"  # noqa: E731
    fused_row = next(line for line in table.splitlines() if line.startswith("fused orderer"))
    assert fused_row.split("|")[1].split() == [row(rep["fused"]).strip(), row(rep["fused_text"]).strip()]
    assert fused_row.split("|")[2].split() == [row(weak["fused"]).strip(), row(weak["fused_text"]).strip()]
    assert f"{100 * weak['alignment_accuracy']:.1f}%" in table
    narrating = json.loads((out / "data-narrating" / "synth_meta.json").read_text())["stories"]
    assert {v["split"] for v in narrating.values()} == {"test"} and any(any(v["narrating"]) for v in narrating.values())
    # the run's model card renders the demo's test table, ceilings included, beside the validation table
    from huggingface_hub import ModelCard

    from iterwego.data.readers import load_split
    from iterwego.data.synth import pmr_ceilings

    card = ModelCard.load(out / "run" / "README.md")
    assert card.data.library_name == "iterwego" and card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"]
    test = card.text[card.text.index("**test** split") : card.text.index("**val** split")]
    fused = rep["fused"]
    assert f"| fused orderer | {100 * fused['acc']:.1f} | {100 * fused['pmr']:.1f} | {fused['tau']:+.3f} |" in test
    assert "| **guided (val-chosen:" in test and "| round 3 |" in test
    ceil = pmr_ceilings(out / "data", "test")
    assert f"images alone {100 * ceil['image']:.1f}, sentences alone {100 * ceil['text']:.1f}" in test
    for section in ("## How to load", "## Training configuration", "## Data", "## Backbones", "## Citation"):
        assert section in card.text
    n_test = len(load_split(out / "data", "test"))
    assert f"| test | {n_test} | evaluation below |" in card.text and "Intended use and limits" in card.text

    calls = []
    orig = encoders.Encoder.featurize
    monkeypatch.setattr(
        encoders.Encoder, "featurize", lambda self, items, **kw: calls.append(len(items)) or orig(self, items, **kw)
    )
    # the demo's own seed and preset: train and val features were cached by the demo's training
    again = [
        "train",
        "--data",
        str(out / "data"),
        "--out",
        str(tmp_path / "again"),
        "--quiet",
        "--cache-dir",
        str(cache),
    ]
    assert main([*again, *FAST]) == 0
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


def test_demo_on_the_sky_family_prints_its_table_with_ceilings(tmp_path, capsys):
    """`iterwego demo --family sky`: the second synthetic family end to end, its ceilings and shares in the table."""
    out = tmp_path / "sky"
    assert main(["demo", "--out", str(out), "--family", "sky", "--stories", "20", "--quiet", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "synthetic test split (sky family)" in printed and "PMR / ceiling (%)" in printed
    assert "50% narrating" in printed  # the weak-alignment table, in both families
    # a demo whose own sentences already narrate that much prints no second table
    assert main(["demo", "--out", str(tmp_path / "weak"), "--stories", "20", "--narrate", "0.5", "--quiet", *FAST]) == 0
    assert "[3/3]" in capsys.readouterr().out and not (tmp_path / "weak" / "data-narrating").exists()
    meta = json.loads((out / "data" / "synth_meta.json").read_text())
    assert meta["config"]["family"] == "sky" and meta["config"]["hide_text"] == 0.45
    ceil = json.loads((out / "data" / "ceilings.json").read_text())["test"]
    assert f"images alone {100 * ceil['image_pmr']:.1f}, sentences alone {100 * ceil['text_pmr']:.1f}" in printed
    assert "fused orderer" in printed
