"""One typed result: `iterwego.result.decode_output` against the decoder story by story, the run's inference
settings (saved with the run, or derived from a 0.1/0.2 run's meta.json), and the metrics JSON's fused rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from iterwego.capture_time import placed_by_time
from iterwego.config import Config, InferenceConfig
from iterwego.decode import MAX_EXACT, combine, decode_story, pair_logprobs
from iterwego.fusion import sentence_order
from iterwego.model import ForwardOutput
from iterwego.pretrained import read_config
from iterwego.result import VARIANTS, Inference, Variant, decode_output, inference_settings
from iterwego.tables import metrics_json

V01 = Path(__file__).parent / "data" / "run_v0_1"


def _output(lengths: list[int], rounds: int, seed: int = 0) -> ForwardOutput:
    """A padded batch's worth of random logits, rank terms and a pairing (image k <-> sentence n-1-k)."""
    g = torch.Generator().manual_seed(seed)
    B, n = len(lengths), max(lengths)
    logits = lambda: torch.randn(B, n, n, 2, generator=g)  # noqa: E731
    pairing = torch.full((B, n), -1)
    for b, k in enumerate(lengths):
        pairing[b, :k] = torch.arange(k - 1, -1, -1)
    ranks = {m: torch.randn(B, n, 16, generator=g).log_softmax(-1) for m in ("image", "text", "fused")}
    return ForwardOutput(
        image=[logits() for _ in range(rounds + 1)],
        text=[logits() for _ in range(rounds + 1)],
        scores=torch.randn(B, n, n, generator=g),
        pairing=pairing,
        fused=logits(),
        ranks=ranks,
    )


def _reference(logits: torch.Tensor, b: int, n: int, unary: torch.Tensor | None, before=None):
    lp = pair_logprobs(logits).float().numpy()[b, :n, :n]
    u = None if unary is None else unary.double().numpy()[b, :n, :n]
    order, fell = decode_story(lp, "exact", before=before, unary=u)
    return order, fell, np.exp(combine(lp))


def test_every_variant_is_the_decoder_on_its_story():
    lengths = [5, 3, MAX_EXACT + 1]  # the last is above the exact decoder's limit: beam, reported
    fw, w = _output(lengths, rounds=2), 2.5
    stories = decode_output(fw, {"image": lengths, "text": lengths}, Inference({}, {}, "exact", w))
    assert len(stories) == 3
    for b, (n, s) in enumerate(zip(lengths, stories)):
        for m in ("image", "text"):
            assert sorted(s.rounds(m)) == [0, 1, 2]
            for r, got in s.rounds(m).items():
                order, fell, p = _reference(getattr(fw, m)[r], b, n, w * fw.ranks[m] if r == 0 else None)
                assert (got.order, got.fell_back, got.rounds, got.timed) == (order, fell, r, False)
                assert got.confidence == [p[i, j] for i, j in zip(order, order[1:])]  # same float64 values
        order, fell, _ = _reference(fw.fused, b, n, w * fw.ranks["fused"])
        assert s.fused.order == order and s.fused.fell_back == fell
        assert s.fused_sentences == sentence_order(order, fw.pairing[b, :n].tolist(), n)
        assert s.pairing == list(range(n - 1, -1, -1))
        assert s.pairing_score == [float(fw.scores[b, k, n - 1 - k]) for k in range(n)]
        assert s.fell_back() == (n > MAX_EXACT)


def test_capture_times_bind_the_image_and_fused_orders_and_show_as_certain_steps():
    lengths = [6, 4]
    fw = _output(lengths, rounds=1, seed=3)
    before = np.zeros((2, 6, 6), bool)
    before[0, 5, 0] = before[0, 0, 2] = before[1, 3, 1] = True  # item 5 before 0 before 2; story 1: 3 before 1
    stories = decode_output(
        fw, {"image": lengths, "text": lengths}, Inference({}, {}, "exact", 1.0), rounds={"image": [1]}, before=before
    )
    for b, (n, s) in enumerate(zip(lengths, stories)):
        assert list(s.image) == [1] and sorted(s.text) == [0, 1]  # the rounds asked for; sentences unbound
        for got in (s.image[1], s.fused):
            assert got.timed and got.placed_by_time == placed_by_time(before[b, :n, :n]).tolist()
            pos = {k: i for i, k in enumerate(got.order)}
            assert all(pos[i] < pos[j] for i, j in zip(*np.nonzero(before[b, :n, :n])))
            for k, (i, j) in enumerate(zip(got.order, got.order[1:])):
                if before[b, i, j]:
                    assert got.confidence[k] > 1 - 1e-6  # pinned logits: P = 1 up to float32's logsigmoid
        assert not s.text[0].timed and s.text[0].placed_by_time == []
    assert stories[0].image[1].placed_by_time == [True, False, True, False, False, True]


def test_variant_names_are_the_keys_order_json_writes():
    assert [v.value for v in VARIANTS] == ["image_only", "text_only", "guided", "fused"]
    assert Variant("fused") is Variant.FUSED


def test_a_v0_1_run_gets_its_inference_section_from_meta_json(tmp_path):
    cfg, meta = read_config(V01)
    assert "inference" not in json.loads((V01 / "config.json").read_text())
    assert cfg.inference == InferenceConfig(image_rounds=1, text_rounds=2, capture_image_rounds=None)
    settings = inference_settings(cfg)
    assert (settings.rounds, settings.capture_rounds, settings.decoder, settings.chosen) == (
        {"image": 1, "text": 2},
        {},
        cfg.train.decoder,
        True,
    )
    assert settings.guided_rounds(timed=True) == {"image": 1, "text": 2}
    assert inference_settings(cfg, "beam").decoder == "beam"
    # a run without rounds anywhere (an imported checkpoint): not chosen, round 0
    run = tmp_path / "run"
    shutil.copytree(V01, run)
    (run / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "chosen_rounds"}))
    cfg, _ = read_config(run)
    assert not cfg.inference.chosen() and inference_settings(cfg).guided_rounds(False) == {"image": 0, "text": 0}


def test_the_inference_section_is_saved_with_the_run_and_overridable(tmp_path):
    from iterwego.model import IterWeGO

    model = IterWeGO.from_pretrained(V01)
    model.cfg.inference = InferenceConfig(image_rounds=2, text_rounds=0, capture_image_rounds=1)
    model.save_pretrained(tmp_path / "run", meta={"chosen_rounds": {"image": 9, "text": 9}})
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["inference"]
    assert saved == {"image_rounds": 2, "text_rounds": 0, "capture_image_rounds": 1}
    cfg, _ = read_config(tmp_path / "run")  # the typed section wins over meta.json
    assert inference_settings(cfg).guided_rounds(timed=True) == {"image": 1, "text": 0}
    cfg = cfg.override(["inference.text_rounds=3"])
    assert cfg.inference.text_rounds == 3 and Config.from_dict(cfg.to_dict()).inference == cfg.inference


def test_the_metrics_json_records_the_fused_order_of_both_modalities_and_its_ceiling_share():
    report = {
        "image": {"unimodal": {"acc": 0.5, "pmr": 0.2, "tau": 0.5}},
        "fused": {"acc": 0.6, "pmr": 0.3, "tau": 0.7},
        "fused_text": {"acc": 0.55, "pmr": 0.25, "tau": 0.65},
        "fusion": "orderer",
    }
    assert metrics_json(report) is report  # real data: no ceilings, nothing added
    out = metrics_json(report, {"image": 0.4, "text": 0.5, "fused": 0.6})
    assert out["ceilings"] == {"image": 0.4, "text": 0.5, "fused": 0.6}
    # both fused rows against the item-level fusion ceiling (0.3 / 0.6, 0.25 / 0.6), exact up to one division
    assert out["fused_ceiling_share"] == pytest.approx({"image": 0.5, "text": 0.25 / 0.6}, rel=1e-12)


def test_evaluate_json_of_a_trained_run_holds_both_fused_rows(trained_run):
    m = trained_run.metrics
    assert set(m["fused_text"]) == {"acc", "pmr", "tau"}
    assert set(m["fused_ceiling_share"]) == {"image", "text"}
    for mod, key in (("image", "fused"), ("text", "fused_text")):
        assert m["fused_ceiling_share"][mod] == pytest.approx(m[key]["pmr"] / m["ceilings"]["fused"], rel=1e-12)
    # the run saved by this code carries its inference section, equal to the rounds in meta.json
    saved = json.loads((trained_run.run / "config.json").read_text())["inference"]
    meta = json.loads((trained_run.run / "meta.json").read_text())
    assert {"image": saved["image_rounds"], "text": saved["text_rounds"]} == meta["chosen_rounds"]
