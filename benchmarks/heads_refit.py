"""How much of one run's fused result is the last stage's own lottery, and does an ensemble of heads help?

Takes saved demo runs, keeps their orderers and aligner, and trains the last stage (rank heads and fused
orderer, ``TrainRecipe.fit_heads``) again from a fresh initialisation and batch order per head seed, optionally
with ``--set fusion.ensemble=K``. Prints validation and test PMR of the unimodal (with position terms) and fused
orders, and the stage's CPU seconds; guided rounds are chosen on validation.

    python benchmarks/heads_refit.py RUN_DIR [RUN_DIR ...] [--head-seeds 0 1 2] [--set fusion.ensemble=3]

``RUN_DIR`` is a demo output (``RUN_DIR/run``, ``RUN_DIR/data``). One thread; about a minute per head seed for
``ensemble=1`` on an AMD EPYC core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HEADS = ("fuser.", "image.ranker.", "text.ranker.")


def refit(work: Path, head_seed: int, sets: list[str]) -> dict:
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import build_features
    from iterwego.data.readers import load_split
    from iterwego.model import load_run
    from iterwego.training.evaluator import Evaluator
    from iterwego.training.recipe import TrainRecipe

    saved, _ = load_run(work / "run")
    cfg = saved.cfg.override([f"train.seed={head_seed + 100}", "train.num_threads=1", *sets])
    cache = FeatureCache(FeatureCache.default_root())
    with tempfile.TemporaryDirectory() as tmp:
        r = TrainRecipe(cfg, work / "data", tmp, progress=False, log=lambda *a, **k: None, cache=cache).setup()
        kept = {k: v for k, v in saved.state_dict().items() if not k.startswith(HEADS)}
        missing, unexpected = r.model.load_state_dict(kept, strict=False)
        assert all(k.startswith(HEADS) for k in missing) and not unexpected
        c0 = time.process_time()
        r.fit_heads()
        cpu = time.process_time() - c0
        model = r.model.eval()
    stories = {s: load_split(work / "data", s) for s in ("val", "test")}
    sets_, feats = build_features(model.encoders(), stories, cache=cache, dtype=cfg.encoder.feature_dtype)
    ev = {s: Evaluator(sets_[s], feats, seed=cfg.train.seed + 2)(model) for s in stories}
    chosen = ev["val"].choose_rounds()
    out: dict = {"head_seed": head_seed, "heads_cpu_s": cpu}
    for s in stories:
        rep = ev[s].report(chosen)
        out[s] = {
            "unimodal img": rep["image"]["unimodal"]["pmr"],
            "unimodal txt": rep["text"]["unimodal"]["pmr"],
            "fused img": rep["fused"]["pmr"],
            "fused txt": rep["fused_text"]["pmr"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="demo output directories")
    p.add_argument("--head-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. fusion.ensemble=3")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = []
    for run in a.runs:
        for hs in a.head_seeds:
            got = {"run": run, "set": a.set, **refit(Path(run), hs, a.set)}
            results.append(got)
            cells = " ".join(f"{k} {100 * v:5.1f}" for k, v in got["test"].items())
            print(f"{Path(run).name} {a.set} head seed {hs}: test {cells}; heads {got['heads_cpu_s']:.0f} CPU s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
