"""Fusion and decoding variants on both synthetic families, measured on validation: what does each part buy?

Trains (or reuses) one ``iterwego demo`` run per family and seed, then evaluates every run under each
variant below. A variant is a set of load-time overrides of the same trained run, so the orderers, the
aligner and the guided rounds are the same in every variant; only what reads them changes:

- ``0.2``: fused decoding as iterwego 0.2 did it (sum of both round-0 pair log-odds on aligned items) and
  pairwise decoding everywhere (``fusion.method=sum``, ``orderer.rank_head=false``);
- ``positions``: 0.2 plus the rank heads' position terms in the unimodal orders (fusion still a sum);
- ``fused orderer``: the fused orderer, pair terms only (``orderer.rank_head=false``);
- ``default``: the fused orderer with its rank head, and position terms in the unimodal orders (the ``tiny``
  preset as trained);
- ``weight W``: the default with the position terms weighted W (``orderer.rank_weight``).

Each row is the mean over seeds of PMR as a share of the split's Bayes ceiling: unimodal orders against
their own modality's ceiling, guided and fused orders against item-level fusion. Choices are made on the
validation split; ``--split test`` prints the same table on test, for the record only.

    python benchmarks/fusion.py [--work DIR] [--families tank sky] [--seeds 0 1 2] [--split val] [--json OUT]

A demo run takes about 2 minutes on 2 CPU cores (``--threads 1`` per run); evaluations take seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "0.2": ["fusion.method=sum", "orderer.rank_head=false"],
    "positions": ["fusion.method=sum"],
    "fused orderer": ["orderer.rank_head=false"],
    "default": [],
    "weight 0.5": ["orderer.rank_weight=0.5"],
    "weight 2": ["orderer.rank_weight=2.0"],
    "weight 3": ["orderer.rank_weight=3.0"],
    "weight 4": ["orderer.rank_weight=4.0"],
}
COLUMNS = ("unimodal img", "unimodal txt", "guided img", "guided txt", "fused")


def train(out: Path, family: str, seed: int, threads: int) -> None:
    if (out / "run" / "model.safetensors").is_file():
        return
    cmd = [sys.executable, "-m", "iterwego", "demo", "--out", str(out), "--family", family, "--seed", str(seed)]
    cmd += ["--quiet", "--set", f"train.num_threads={threads}"]
    print(f"training {out} ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def shares(run: Path, data: Path, split: str, overrides: list[str]) -> dict:
    """PMR shares of one run on ``split`` under ``overrides``; guided rounds chosen on validation."""
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import build_features
    from iterwego.data.readers import load_split
    from iterwego.data.synth import pmr_ceilings
    from iterwego.model import load_run
    from iterwego.training.evaluator import Evaluator

    model, _ = load_run(run, overrides=overrides)
    splits = list(dict.fromkeys(["val", split]))
    stories = {s: load_split(data, s) for s in splits}
    cache = FeatureCache(FeatureCache.default_root())
    sets, feats = build_features(model.encoders(), stories, cache=cache, dtype=model.cfg.encoder.feature_dtype)
    ev = {s: Evaluator(sets[s], feats, seed=model.cfg.train.seed + 2)(model) for s in splits}
    rep = ev[split].report(ev["val"].choose_rounds())
    c = pmr_ceilings(data, split)
    return {
        "unimodal img": rep["image"]["unimodal"]["pmr"] / c["image"],
        "unimodal txt": rep["text"]["unimodal"]["pmr"] / c["text"],
        "guided img": rep["image"]["guided"]["pmr"] / c["fused"],
        "guided txt": rep["text"]["guided"]["pmr"] / c["fused"],
        "fused": rep["fused"]["pmr"] / c["fused"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="fusion-work", help="demo runs live here, reused (default ./fusion-work)")
    p.add_argument("--families", nargs="+", default=["tank", "sky"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.work)
    out: dict = {"split": a.split, "seeds": a.seeds, "variants": VARIANTS, "families": {}}
    for fam in a.families:
        runs = [work / f"{fam}-{s}" for s in a.seeds]
        for r, s in zip(runs, a.seeds):
            train(r, fam, s, a.threads)
        table = {}
        for name, ov in VARIANTS.items():
            per_seed = [shares(r / "run", r / "data", a.split, ov) for r in runs]
            table[name] = {k: float(np.mean([x[k] for x in per_seed])) for k in COLUMNS}
            table[name]["per_seed"] = per_seed
        out["families"][fam] = table
        print(f"\n{fam} family, {a.split} split, mean of seeds {a.seeds}: PMR as % of its ceiling")
        print(f"{'variant':15s}" + "".join(f"{c:>14s}" for c in COLUMNS))
        for name, row in table.items():
            print(f"{name:15s}" + "".join(f"{100 * row[c]:14.1f}" for c in COLUMNS))
    print(f"\ntotal {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
