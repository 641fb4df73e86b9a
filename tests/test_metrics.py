"""Behaviour of iterwego.metrics: order quality as the ordering literature computes it."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iterwego.metrics import format_metrics, order_metrics

# Metrics are ratios of small integer counts, averaged in float64 Python: pytest.approx (rel 1e-6) and abs=1e-12
# compare O(1) values after a handful of float64 operations (~1e-16 each), the same on every CPU; no float32 and
# no SIMD reduction is involved. A wrong count moves a metric by at least 1/(items) >= 1e-3.

KEYS = {
    "acc",
    "pmr",
    "tau",
    "tau_excluded",
    "lcs",
    "window_1",
    "window_2",
    "window_3",
    "n_stories",
    "n_items",
    "by_length",
}


# ------------------------------------------------------------------ brute-force definitions


def lcs_table(a, b) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def reference(predicted, gold) -> dict:
    items = sum(len(g) for g in gold)
    correct = sum(p == g for pr, go in zip(predicted, gold) for p, g in zip(pr, go))
    taus, windows = [], {1: 0, 2: 0, 3: 0}
    for pr, go in zip(predicted, gold):
        rank = {x: i for i, x in enumerate(pr)}
        pairs = list(itertools.combinations(go, 2))  # (a, b) with a before b in gold
        if pairs:
            discordant = sum(rank[a] > rank[b] for a, b in pairs)
            taus.append(1 - 2 * discordant / len(pairs))
        for g_pos, x in enumerate(go):
            for w in windows:
                windows[w] += abs(rank[x] - g_pos) <= w
    return {
        "acc": correct / items,
        "pmr": sum(list(p) == list(g) for p, g in zip(predicted, gold)) / len(gold),
        "tau": sum(taus) / len(taus) if taus else 1.0,
        "tau_excluded": len(gold) - len(taus),
        "lcs": sum(lcs_table(p, g) / len(g) for p, g in zip(predicted, gold)) / len(gold),
        **{f"window_{w}": c / items for w, c in windows.items()},
        "n_stories": len(gold),
        "n_items": items,
    }


story = st.lists(st.one_of(st.integers(-5, 40), st.text(max_size=3)), min_size=1, max_size=9, unique=True).flatmap(
    lambda gold: st.tuples(st.permutations(gold), st.just(gold))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(story, min_size=1, max_size=12))
def test_matches_brute_force_definitions(stories):
    predicted = [p for p, _ in stories]
    gold = [g for _, g in stories]
    got = order_metrics(predicted, gold)
    want = reference(predicted, gold)
    assert set(got) >= KEYS
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # (ranges such as tau in [-1, 1] follow from the equality above; the window order is a property of its own)
    assert got["acc"] <= got["window_1"] <= got["window_2"] <= got["window_3"]
    # by_length: counts add up and each group is the metric restricted to that length
    by = got["by_length"]
    assert list(by) == sorted(by) and all(type(n) is int for n in by)
    assert sum(v["count"] for v in by.values()) == len(gold)
    assert sum(n * v["count"] for n, v in by.items()) == got["n_items"]
    for n, v in by.items():
        idx = [k for k, g in enumerate(gold) if len(g) == n]
        sub = reference([predicted[k] for k in idx], [gold[k] for k in idx])
        assert v["count"] == len(idx)
        for key in ("acc", "pmr", "tau"):
            assert v[key] == pytest.approx(sub[key], abs=1e-12), (n, key)
    assert sum(v["acc"] * n * v["count"] for n, v in by.items()) == pytest.approx(got["acc"] * got["n_items"])
    # plain Python numbers, JSON-serialisable
    for key in KEYS - {"by_length"}:
        assert type(got[key]) in (float, int), key
    assert json.loads(json.dumps(got))["n_items"] == got["n_items"]


def test_hand_computed_stories():
    predicted = [["b", "a", "c", "d"], ["z", "y", "x"], ["q"]]
    gold = [["a", "b", "c", "d"], ["x", "y", "z"], ["q"]]
    # story 0 (n=4): c, d in place -> 2 correct; 1 discordant pair (a, b) of 6 -> tau = 1 - 2/6 = 2/3;
    #   LCS "acd" = 3 -> 3/4; displacements 1, 1, 0, 0 -> all 4 within 1.
    # story 1 (n=3): only y in place -> 1 correct; reversed -> 3 of 3 pairs discordant -> tau = -1;
    #   LCS 1 -> 1/3; displacements 2, 0, 2 -> 1 within 1, 3 within 2.
    # story 2 (n=1): 1 correct, no pairs -> excluded from tau; LCS 1/1.
    # acc = (2 + 1 + 1) / 8 = 0.5; pmr = 1/3; tau = (2/3 - 1) / 2 = -1/6; lcs = (3/4 + 1/3 + 1) / 3 = 25/36
    # window_1 = (4 + 1 + 1) / 8 = 0.75; window_2 = window_3 = 8/8 = 1.
    d = order_metrics(predicted, gold)
    assert d["acc"] == pytest.approx(0.5)
    assert d["pmr"] == pytest.approx(1 / 3)
    assert d["tau"] == pytest.approx(-1 / 6)
    assert d["tau_excluded"] == 1
    assert d["lcs"] == pytest.approx(25 / 36)
    assert (d["window_1"], d["window_2"], d["window_3"]) == pytest.approx((0.75, 1.0, 1.0))
    assert (d["n_stories"], d["n_items"]) == (3, 8)
    assert d["by_length"] == {
        1: {"acc": 1.0, "pmr": 1.0, "tau": 1.0, "count": 1},
        3: {"acc": pytest.approx(1 / 3), "pmr": 0.0, "tau": -1.0, "count": 1},
        4: {"acc": 0.5, "pmr": 0.0, "tau": pytest.approx(2 / 3), "count": 1},
    }


def test_long_story_far_displacement():
    # gold 0..5, predicted [5, 0, 1, 2, 3, 4]: nothing in place (acc 0); 5 is discordant with the
    # other 5 items -> tau = 1 - 2*5/15 = 1/3; LCS 0..4 = 5/6; 5 is displaced by 5, the rest by 1
    # -> window_1..3 = 5/6.
    d = order_metrics([[5, 0, 1, 2, 3, 4]], [list(range(6))])
    assert d["acc"] == 0.0 and d["pmr"] == 0.0
    assert d["tau"] == pytest.approx(1 / 3)
    assert d["lcs"] == pytest.approx(5 / 6)
    assert d["window_1"] == d["window_3"] == pytest.approx(5 / 6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=8))
def test_perfect_and_reversed_predictions(lengths):
    gold = [list(range(n)) for n in lengths]
    perfect = order_metrics(gold, gold)
    assert perfect["pmr"] == 1.0 and perfect["acc"] == 1.0 and perfect["tau"] == 1.0 and perfect["lcs"] == 1.0
    assert perfect["window_1"] == 1.0
    reversed_ = order_metrics([g[::-1] for g in gold], gold)
    if any(n >= 2 for n in lengths):
        assert reversed_["tau"] == -1.0
        assert reversed_["pmr"] == pytest.approx(sum(n == 1 for n in lengths) / len(lengths))
    assert reversed_["acc"] == pytest.approx(sum(n % 2 for n in lengths) / sum(lengths))  # only odd middles stay


def test_one_item_stories_are_excluded_from_tau_and_counted():
    gold = [["a", "b"], ["c"], ["d"]]
    d = order_metrics([["b", "a"], ["c"], ["d"]], gold)
    assert d["tau"] == -1.0  # the two 1-item stories would otherwise pull it to -1/3
    assert d["tau_excluded"] == 2
    assert "tau excludes 2 one-item stories" in format_metrics(d)
    only_singletons = order_metrics([["x"], [7]], [["x"], [7]])
    assert only_singletons["tau"] == 1.0 and only_singletons["tau_excluded"] == 2


def test_large_batches_match_per_story_values():
    # enough long stories to go through the chunked pair comparison
    n, m = 250, 80
    gold = [list(range(n))] * m
    predicted = [list(range(n))[::-1] if k % 2 else list(range(n)) for k in range(m)]
    d = order_metrics(predicted, gold)
    assert d["tau"] == pytest.approx(0.0)  # half +1, half -1
    assert d["by_length"][n]["count"] == m
    assert d["pmr"] == 0.5


@pytest.mark.parametrize(
    "predicted, gold, message",
    [
        ([[0, 1]], [[0, 1], [0]], "1 predicted stories but 2 gold"),
        ([[0, 1], [0, 2]], [[0, 1], [0, 1]], r"story 1: predicted item 2 is not in the gold story"),
        ([[0, 1, 1]], [[0, 1, 2]], "story 0: prediction lists an item more than once"),
        ([[0, 1]], [[0, 1, 2]], "story 0: prediction has 2 items but gold has 3"),
        ([[0, 0]], [[0, 0]], "story 0: gold order lists an item more than once"),
        ([[0], []], [[0], []], "story 1: gold order has no items"),
        ([[[1], [2]]], [[[1], [2]]], "story 0: items must be hashable"),
        ([], [], "no stories"),
    ],
)
def test_mismatches_raise_value_error_naming_the_story(predicted, gold, message):
    with pytest.raises(ValueError, match=message):
        order_metrics(predicted, gold)


def test_format_metrics_is_one_line_with_the_numbers():
    d = order_metrics([[1, 0, 2], [0, 1, 2, 3]], [[0, 1, 2], [0, 1, 2, 3]])
    # acc = (1 + 4) / 7 = 71.43%, pmr = 1/2, tau = (1/3 + 1) / 2 = 0.6667
    line = format_metrics(d)
    assert "\n" not in line
    for part in ("acc 71.43%", "pmr 50.00%", "tau 0.6667", "2 stories, 7 items", "tau excludes 0 one-item stories"):
        assert part in line
