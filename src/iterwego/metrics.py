"""Order-quality metrics as the sentence/image-ordering literature computes them.

Every story is given twice: its items in predicted order and in gold order.
Items are any hashables (indices, ids, sentences); a prediction must be a
permutation of its gold story. With ``pos`` the gold position of each item and
``n`` the story length:

``acc``
    fraction of items at their gold absolute position, over all items (micro average).
``pmr``
    perfect match ratio: fraction of stories predicted exactly.
``tau``
    Kendall's tau ``1 - 2 * discordant / C(n, 2)`` per story, averaged over the
    stories with ``n >= 2``. A 1-item story has no pairs, so its tau is undefined:
    it is left out of the average and counted in ``tau_excluded``. If *every*
    story has one item, ``tau`` is 1.0 (vacuously perfect, like ``pmr``), so
    ``pmr == 1`` always implies ``tau == 1`` and the value stays JSON-safe.
``lcs``
    length of the longest common subsequence of prediction and gold, divided by
    ``n``, averaged over stories.
``window_1``, ``window_2``, ``window_3``
    fraction of items whose predicted position is within w of the gold one, over all items.
``n_stories``, ``n_items``, ``tau_excluded``
    counts (ints).
``by_length``
    ``{n: {"acc", "pmr", "tau", "count"}}`` per story length (int keys, ascending);
    ``tau`` of the 1-item group is 1.0 by the rule above.

All metric values are fractions in [0, 1] (tau in [-1, 1]) and plain Python
floats/ints, so the dict serialises to JSON as is.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import Any, Hashable, Sequence

import numpy as np

__all__ = ["WINDOWS", "order_metrics", "format_metrics"]

WINDOWS = (1, 2, 3)

_CHUNK_ELEMS = 1 << 22  # bound on the (stories, n, n) comparison tensor built at once


def _gold_positions(k: int, pred: Sequence[Hashable], gold: Sequence[Hashable]) -> np.ndarray:
    """Gold position of each predicted item, validating that pred is a permutation of gold."""
    pred, gold = list(pred), list(gold)
    if not gold:
        raise ValueError(f"story {k}: gold order has no items")
    try:
        where = {item: i for i, item in enumerate(gold)}
    except TypeError as err:
        raise ValueError(f"story {k}: items must be hashable ({err})") from None
    if len(where) != len(gold):
        raise ValueError(f"story {k}: gold order lists an item more than once")
    if len(pred) != len(gold):
        raise ValueError(f"story {k}: prediction has {len(pred)} items but gold has {len(gold)}")
    try:
        pos = [where[item] for item in pred]
    except (KeyError, TypeError):
        missing = next((item for item in pred if not _lookup_ok(where, item)), None)
        raise ValueError(f"story {k}: predicted item {missing!r} is not in the gold story") from None
    if len(set(pos)) != len(pos):
        raise ValueError(f"story {k}: prediction lists an item more than once")
    return np.asarray(pos, dtype=np.int64)


def _lookup_ok(where: dict, item: Any) -> bool:
    try:
        return item in where
    except TypeError:
        return False


def _lis_length(seq: Sequence[int]) -> int:
    """Longest strictly increasing subsequence (patience sorting).

    With distinct gold positions listed in predicted order, this equals the LCS
    of the predicted and gold orders.
    """
    tails: list[int] = []
    for x in seq:
        i = bisect_left(tails, x)
        if i == len(tails):
            tails.append(x)
        else:
            tails[i] = x
    return len(tails)


def _discordant(pos: np.ndarray) -> np.ndarray:
    """Discordant pairs per row of ``pos`` (stories x n gold positions in predicted order)."""
    m, n = pos.shape
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    step = max(1, _CHUNK_ELEMS // max(1, n * n))
    out = np.empty(m, dtype=np.int64)
    for lo in range(0, m, step):
        p = pos[lo : lo + step]
        out[lo : lo + step] = ((p[:, :, None] > p[:, None, :]) & upper).sum(axis=(1, 2))
    return out


def order_metrics(predicted: Sequence[Sequence[Hashable]], gold: Sequence[Sequence[Hashable]]) -> dict:
    """Compare predicted story orders with gold ones.

    Args:
        predicted: one sequence per story, its items in predicted order.
        gold: one sequence per story, its items in gold order (same stories, same order).

    Returns:
        ``{"acc", "pmr", "tau", "tau_excluded", "lcs", "window_1", "window_2", "window_3",
        "n_stories", "n_items", "by_length"}`` as described in the module docstring.

    Raises:
        ValueError: different numbers of stories, no stories, an empty story, or a
            prediction that is not a permutation of its gold story (the message names the story index).
    """
    if len(predicted) != len(gold):
        raise ValueError(f"got {len(predicted)} predicted stories but {len(gold)} gold stories")
    if len(gold) == 0:
        raise ValueError("no stories to evaluate")
    groups: dict[int, list[np.ndarray]] = defaultdict(list)
    for k, (p, g) in enumerate(zip(predicted, gold)):
        pos = _gold_positions(k, p, g)
        groups[len(pos)].append(pos)

    n_stories = len(gold)
    n_items = 0
    correct = exact = 0
    tau_sum, tau_count = 0.0, 0
    lcs_sum = 0.0
    window_hits = dict.fromkeys(WINDOWS, 0)
    by_length: dict[int, dict[str, float | int]] = {}
    for n in sorted(groups):
        pos = np.stack(groups[n])  # (stories of length n, n)
        m = pos.shape[0]
        slot = np.arange(n)
        hits = pos == slot
        g_correct = int(hits.sum())
        g_exact = int(hits.all(axis=1).sum())
        if n >= 2:
            taus = 1.0 - 2.0 * _discordant(pos) / (n * (n - 1) / 2)
            g_tau = float(taus.mean())
            tau_sum += float(taus.sum())
            tau_count += m
        else:
            g_tau = 1.0
        dist = np.abs(pos - slot)
        for w in WINDOWS:
            window_hits[w] += int((dist <= w).sum())
        lcs_sum += sum(_lis_length(row) for row in pos.tolist()) / n
        n_items += m * n
        correct += g_correct
        exact += g_exact
        by_length[int(n)] = {"acc": g_correct / (m * n), "pmr": g_exact / m, "tau": g_tau, "count": m}

    result: dict[str, Any] = {
        "acc": correct / n_items,
        "pmr": exact / n_stories,
        "tau": tau_sum / tau_count if tau_count else 1.0,
        "tau_excluded": n_stories - tau_count,
        "lcs": lcs_sum / n_stories,
    }
    for w in WINDOWS:
        result[f"window_{w}"] = window_hits[w] / n_items
    result.update(n_stories=n_stories, n_items=n_items, by_length=by_length)
    return result


def format_metrics(d: dict) -> str:
    """One summary line of an :func:`order_metrics` result (acc/pmr/lcs/windows in percent)."""
    windows = "/".join(f"{100 * d[f'window_{w}']:.1f}" for w in WINDOWS)
    excluded = d.get("tau_excluded", 0)
    note = f", tau excludes {excluded} one-item {'story' if excluded == 1 else 'stories'}"
    return (
        f"acc {100 * d['acc']:.2f}% | pmr {100 * d['pmr']:.2f}% | tau {d['tau']:.4f} | lcs {100 * d['lcs']:.2f}% | "
        f"window 1/2/3 {windows}% | {d['n_stories']} stories, {d['n_items']} items{note}"
    )
