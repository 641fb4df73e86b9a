"""How the fused order reaches the sentences: carried through the pairing, or decoded in their own items.

The pairing probabilities (``aligner.pairing_marginals``, ``fusion.soft_pairing``) are checked against brute
force over every one-to-one pairing, and ``pairing_positions`` by hand. ``decode_output`` with
``fusion.sentences=decoded`` runs on built logits where the answer is known: a confident pairing keeps the
carried order, and a pairing that swaps two sentences the aligner cannot tell apart is repaired by the
sentences' own evidence. A user's run evaluates and orders under either setting.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iterwego.aligner import MAX_SUBSET_ASSIGNMENT, best_assignment, pairing_marginals
from iterwego.config import ConfigError, FusionConfig
from iterwego.fusion import pairing_positions, soft_pairing
from iterwego.model import ForwardOutput
from iterwego.result import Inference, decode_output

# float64 sums of a few dozen O(1) terms: 1e-9 holds on any CPU (no float32 anywhere).
MARGIN = 1e-9


def _valid(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _brute_force(s: np.ndarray) -> np.ndarray:
    """Pairing marginals by enumerating every one-to-one pairing of the shorter side (m <= n)."""
    m, n = s.shape
    p = np.zeros((m, n))
    for cols in itertools.permutations(range(n), m):
        w = math.exp(sum(s[i, c] for i, c in enumerate(cols)))
        p[list(range(m)), list(cols)] += w
    return p / p.sum(1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2), st.integers(0, 2**31 - 1), st.sampled_from([0.3, 3.0, 30.0]))
def test_pairing_marginals_match_brute_force(m, extra, seed, scale):
    s = scale * np.random.default_rng(seed).normal(size=(m, m + extra))
    want = _brute_force(s)
    assert np.abs(pairing_marginals(s) - want).max() < MARGIN
    assert np.abs(pairing_marginals(s.T) - want.T).max() < MARGIN  # more rows than columns
    rows, cols = best_assignment(s)
    if scale == 30.0:  # a sharp table: the marginals put nearly all mass on the best assignment
        assert (pairing_marginals(s).argmax(1)[rows] == cols).all()


def test_soft_pairing_masks_padding_and_reads_each_story_alone():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(2, 5, 5, generator=g)
    iv, tv = _valid([3, 5], 5), _valid([3, 5], 5)
    q = soft_pairing(logits, iv, tv)
    assert q.dtype == torch.float64 and torch.all(q[0, 3:] == 0) and torch.all(q[0, :, 3:] == 0)
    assert np.abs(q[0, :3, :3].numpy() - _brute_force(logits[0, :3, :3].double().numpy())).max() < MARGIN
    assert np.abs(q[1].numpy() - _brute_force(logits[1].double().numpy())).max() < MARGIN


def test_pairing_marginals_of_two_items_are_the_two_pairings_odds():
    s = np.array([[1.0, 0.2], [0.5, 0.1]])
    w_id, w_sw = math.exp(1.0 + 0.1), math.exp(0.2 + 0.5)
    assert pairing_marginals(s)[0, 0] == pytest.approx(w_id / (w_id + w_sw), abs=MARGIN)


def test_long_stories_get_sinkhorn_rows_and_columns():
    s = np.random.default_rng(0).normal(size=(MAX_SUBSET_ASSIGNMENT + 2,) * 2)
    p = pairing_marginals(s)
    assert np.allclose(p.sum(1), 1, atol=1e-9) and np.allclose(p.sum(0), 1, atol=1e-3)


def test_pairing_positions_reads_the_image_at_each_step():
    soft = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    u = pairing_positions([2, 0, 1], soft)  # step 0: image 2, step 1: image 0, step 2: image 1
    assert u.shape == (3, 3)
    assert u[0, 1] == pytest.approx(math.log(0.7)) and u[2, 0] == pytest.approx(math.log(0.6))
    assert u[1, 2] == pytest.approx(math.log(0.5))
    assert np.isfinite(pairing_positions([0, 1, 2], np.zeros((3, 3)))).all()  # floored: no step is ruled out


def _logits_for(order: list[int], strength: float) -> torch.Tensor:
    """``(n, n, 2)`` pair logits that say ``order`` with log-odds ``strength`` on every pair."""
    n = len(order)
    pos = {k: i for i, k in enumerate(order)}
    lg = torch.zeros(n, n, 2)
    for i, j in itertools.permutations(range(n), 2):
        lg[i, j, 1] = strength if pos[i] < pos[j] else -strength
    return lg


def _output(img_order, txt_order, txt_strength, scores) -> ForwardOutput:
    n = len(img_order)
    fused = _logits_for(img_order, 3.0)[None]
    text = _logits_for(txt_order, txt_strength)[None]
    s = torch.tensor(scores, dtype=torch.float32)[None]
    v = torch.ones(1, n, dtype=torch.bool)
    from iterwego.aligner import align

    return ForwardOutput(
        image=[_logits_for(img_order, 1.0)[None]],
        text=[text],
        scores=s,
        pairing=align(s, "hungarian", v, v),
        soft_pairing=soft_pairing(s, v, v),
        fused=fused,
    )


def _decode(fw, sentences: str, weight: float = 1.0, decoder: str = "exact"):
    inf = Inference({}, {}, decoder, 3.0, sentences=sentences, pairing_weight=weight)
    n = fw.fused.shape[1]
    return decode_output(fw, {"image": [n], "text": [n]}, inf)[0]


def test_a_confident_pairing_keeps_the_carried_order_even_against_the_sentences_own_evidence():
    # image k tells sentence k; the fused order is 2,0,3,1; the text orderer weakly believes another order
    scores = (20 * torch.eye(4)).tolist()
    fw = _output([2, 0, 3, 1], [0, 1, 2, 3], 0.3, scores)
    carried, decoded = _decode(fw, "carried"), _decode(fw, "decoded")
    assert carried.fused_sentences == [2, 0, 3, 1]
    assert decoded.fused_sentences == carried.fused_sentences
    assert decoded.fused.order == carried.fused.order  # the image order is the same in both


def test_sentences_the_aligner_cannot_tell_apart_are_placed_by_their_own_evidence():
    # sentences 1 and 3 narrate: the aligner scores them alike against images 1 and 3, and Hungarian's tie
    # goes the wrong way (image 1 -> sentence 3); the sentence orderer is sure 1 comes before 3
    scores = [[9.0, 0, 0, 0], [0, 0.5, 0, 0.5 + 1e-3], [0, 0, 9.0, 0], [0, 0.5 + 1e-3, 0, 0.5]]
    fw = _output([0, 1, 2, 3], [0, 1, 2, 3], 2.0, scores)
    carried, decoded = _decode(fw, "carried"), _decode(fw, "decoded")
    assert carried.pairing == [0, 3, 2, 1]
    assert carried.fused_sentences == [0, 3, 2, 1]  # every pairing error is an ordering error
    assert decoded.fused_sentences == [0, 1, 2, 3]
    # weight 0 leaves the sentences to their own orderer; tsort reads no position terms and keeps the carried order
    assert _decode(fw, "decoded", weight=0.0).fused_sentences == [0, 1, 2, 3]
    assert _decode(fw, "decoded", decoder="tsort").fused_sentences == [0, 3, 2, 1]


def test_the_setting_is_checked():
    assert FusionConfig(sentences="decoded", pairing_weight=2.0).sentences == "decoded"
    with pytest.raises(ConfigError, match="fusion.sentences"):
        FusionConfig(sentences="mapped")
    with pytest.raises(ConfigError, match="fusion.pairing_weight"):
        FusionConfig(pairing_weight=-1.0)


def test_a_trained_run_orders_and_evaluates_under_either_setting(trained_run):
    from iterwego.apps.order import order_stories
    from iterwego.data.readers import load_split
    from iterwego.model import load_run
    from iterwego.training.evaluator import evaluate_run

    def report(setting):
        kw = {"overrides": [f"fusion.sentences={setting}"]}
        return evaluate_run(trained_run.run, trained_run.data, "test", progress=False, load_kw=kw).report()

    carried, decoded = report("carried"), report("decoded")
    assert carried["fused"] == decoded["fused"]  # the image side is the same order
    assert 0.0 <= decoded["fused_text"]["pmr"] <= 1.0
    model, _ = load_run(trained_run.run, overrides=["fusion.sentences=decoded"])
    assert model.cfg.fusion.sentences == "decoded"
    story = load_split(trained_run.data, "test")[0]
    got = order_stories(model, [story])[0]
    sentences = got["variants"]["fused"]["sentence_order"]
    assert sorted(sentences) == list(range(len(story.sentences)))


def test_the_soft_pairing_is_computed_only_when_the_sentences_are_decoded(trained_run):
    """Its exact marginals cost a loop over stories in every forward (validation each epoch included): a run that
    carries its fused order to the sentences never pays for them, and orders exactly as before."""
    from iterwego.data.features import build_features
    from iterwego.data.readers import load_split
    from iterwego.model import load_run
    from iterwego.training.evaluator import Evaluator

    models = {s: load_run(trained_run.run, overrides=[f"fusion.sentences={s}"])[0] for s in ("carried", "decoded")}
    # the setting changes no encoder: one feature build serves both models
    sets, feats = build_features(models["carried"].encoders(), {"test": load_split(trained_run.data, "test")})
    got = {}
    for setting, model in models.items():
        seen = []
        model.register_forward_hook(lambda _m, _a, out: seen.append(out.soft_pairing))
        got[setting] = Evaluator(sets["test"], feats, seed=0)(model).report({"image": 1, "text": 1})
        assert seen and all((p is None) == (setting == "carried") for p in seen)
    assert got["carried"]["fused"] == got["decoded"]["fused"]
