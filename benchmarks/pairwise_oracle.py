"""How much PMR does decoding from *pairwise* probabilities lose on the synthetic data?

For each test story this computes the exact posterior pairwise probabilities
P(i before j | visible cues) of the synthetic generative story (the best any
pair classifier can output), decodes them with iterwego's exact decoder, and
reports the expected PMR of that order next to the Bayes-optimal ceiling. The
gap is the price of the pairwise model family itself, before any learning.

    python benchmarks/pairwise_oracle.py DATA_DIR [--split test]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from iterwego.data.synth import story_ceiling
from iterwego.decode import decode


def pairwise_posterior(times, visible, T) -> np.ndarray:
    """P(i before j) given the visible times; hidden times are a uniform subset of the free times."""
    n = len(times)
    vis = {t for t, s in zip(times, visible) if s}
    free = np.array([t for t in range(T) if t not in vis])
    p = np.full((n, n), 0.5)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if visible[i] and visible[j]:
                p[i, j] = float(times[i] < times[j])
            elif visible[j]:  # hidden i: uniform over the free times
                p[i, j] = float((free < times[j]).mean())
            elif visible[i]:
                p[i, j] = float((free > times[i]).mean())
    return np.clip(p, 1e-9, 1 - 1e-9)


def expected_pmr(order, times, visible, T) -> float:
    """Probability that ``order`` (gold indices) is exactly right under the posterior."""
    vt = [times[k] for k in order if visible[k]]
    if vt != sorted(vt):
        return 0.0
    v = len(vt)
    h = len(order) - v
    if h == 0:
        return 1.0
    bounds = [-1, *vt, T]
    counts, k = [0] * (v + 1), 0
    for item in order:
        if visible[item]:
            k += 1
        else:
            counts[k] += 1
    prob = 1.0
    for g, c in zip((bounds[i + 1] - bounds[i] - 1 for i in range(v + 1)), counts):
        prob *= math.comb(g, c)
    return prob / (math.comb(T - v, h) * math.factorial(h))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    meta = json.loads((Path(a.data) / "synth_meta.json").read_text())
    T = meta["config"]["time_steps"]
    rows = {}
    for mod, key in (("images", "image_visible"), ("sentences", "text_visible"), ("fused", None)):
        got, best = [], []
        for st in meta["stories"].values():
            if st["split"] != a.split:
                continue
            vis = [x or y for x, y in zip(st["image_visible"], st["text_visible"])] if key is None else st[key]
            order = decode(np.log(pairwise_posterior(st["times"], vis, T)), method="exact")
            got.append(expected_pmr(order, st["times"], vis, T))
            best.append(story_ceiling(st["times"], vis, T))
        rows[mod] = (float(np.mean(got)), float(np.mean(best)))
    for mod, (g, b) in rows.items():
        print(f"{mod:10s} pairwise-oracle PMR {100 * g:5.1f}   Bayes ceiling {100 * b:5.1f}   ratio {g / b:.3f}")


if __name__ == "__main__":
    main()
