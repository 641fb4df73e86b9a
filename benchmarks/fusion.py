"""Fusion and decoding variants on both synthetic families and several alignment strengths: mean ± spread of seeds.

Trains (or reuses) one ``iterwego demo`` run per family, narrating share (``--narrate``: the share of sentences
that name nothing pictured, docs/synthetic.md) and training seed, then evaluates every run under each variant
below. The seeds vary training only: every run of a family and share reads the same stories (the demo's data
of ``--seed 0``), so the spread is the lottery of one training run.
A variant is a set of load-time overrides of the same trained run, so the orderers, the aligner and the guided
rounds are the same in every variant; only what reads them changes:

- ``0.2``: fused decoding as iterwego 0.2 did it (sum of both round-0 pair log-odds on aligned items) and
  pairwise decoding everywhere (``fusion.method=sum``, ``orderer.rank_head=false``);
- ``positions``: 0.2 plus the rank heads' position terms in the unimodal orders (fusion still a sum);
- ``fused orderer``: the fused orderer, pair terms only (``orderer.rank_head=false``);
- ``carried``: the fused orderer with its rank head, the fused order carried to the sentences through the
  one-to-one pairing (0.3.0's ``tiny`` as trained);
- ``decoded``: the same fused image order; the sentences decoded in their own items, pulled to their image's
  step by the soft pairing (``fusion.sentences=decoded``), at weights 0.5, 1 and 2 (``fusion.pairing_weight``);
- ``plus sum W``: the fused orderer's logits plus W times 0.2's sum of both orderers' log-odds
  (``fusion.sum_weight``): two fusions of one run averaged, at no training cost.

Each cell is PMR on the split (mean over seeds, and the spread: max − min). Guided rounds are chosen on
validation; every choice between variants is made on ``--split val`` (the default); ``--split test`` prints the
same table on test, for the record. Beside them: the aligner's top-1 accuracy, and each fused order's PMR as a
share of its bound: the item-level fusion ceiling, or once sentences narrate the tighter bound of each side
(``synth.narrating_bounds``).

    python benchmarks/fusion.py [--work DIR] [--families tank sky] [--narrate 0 0.5] [--seeds 0 1 2 3 4]
                                [--variants carried decoded] [--split val] [--json OUT] [--markdown OUT]

A demo run takes about 2 minutes on one core of an AMD EPYC (``--threads 1`` per run, ``--jobs 2`` runs at
once); evaluating a run under a variant takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VARIANTS = {
    "0.2": ["fusion.method=sum", "orderer.rank_head=false"],
    "positions": ["fusion.method=sum"],
    "fused orderer": ["orderer.rank_head=false"],
    "carried": ["fusion.sentences=carried"],
    "plus sum 0.5": ["fusion.sum_weight=0.5"],
    "plus sum 1": ["fusion.sum_weight=1.0"],
    "decoded 0.5": ["fusion.sentences=decoded", "fusion.pairing_weight=0.5"],
    "decoded": ["fusion.sentences=decoded", "fusion.pairing_weight=1.0"],
    "decoded 2": ["fusion.sentences=decoded", "fusion.pairing_weight=2.0"],
}
DEFAULT_VARIANTS = ("carried", "decoded 0.5", "decoded", "decoded 2", "plus sum 0.5", "plus sum 1")
COLUMNS = ("unimodal img", "unimodal txt", "guided img", "guided txt", "fused img", "fused txt")


def run_dir(work: Path, family: str, narrate: float, seed: int) -> Path:
    return work / f"{family}-n{narrate:g}-s{seed}"


def train(out: Path, family: str, narrate: float, seed: int, threads: int, sets: list[str]) -> None:
    """One demo run: the data of ``--seed 0`` (the same stories for every seed), trained with ``train.seed``."""
    if (out / "run" / "model.safetensors").is_file():
        return
    cmd = [sys.executable, "-m", "iterwego", "demo", "--out", str(out), "--family", family, "--seed", "0"]
    cmd += [
        "--narrate",
        str(narrate),
        "--quiet",
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.num_threads={threads}",
    ]
    for s in sets:
        cmd += ["--set", s]
    print(f"training {out} ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def measure_cached(work_run: Path, variants: dict[str, list[str]]) -> dict:
    """:func:`measure`, reusing the results kept in ``work_run/fusion-eval.json`` for a variant of the same
    overrides measured after the run was saved (the iterwego version is recorded with them)."""
    import iterwego

    path, run = work_run / "fusion-eval.json", work_run / "run"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    saved = (run / "model.safetensors").stat().st_mtime

    def fresh(name: str) -> bool:
        k = kept.get(name, {})
        return k.get("overrides") == variants[name] and k.get("version") == iterwego.__version__ and k["at"] > saved

    todo = {name: ov for name, ov in variants.items() if not fresh(name)}
    if todo:
        got = measure(run, work_run / "data", todo)
        for name, ov in todo.items():
            kept[name] = {"overrides": ov, "version": iterwego.__version__, "at": time.time(), "result": got[name]}
        path.write_text(json.dumps(kept, indent=1) + "\n")
    return {name: kept[name]["result"] for name in variants}


def measure(run: Path, data: Path, variants: dict[str, list[str]]) -> dict:
    """Per variant and split (val, test): PMR of each column, fusion shares and alignment; rounds chosen on val."""
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import build_features
    from iterwego.data.readers import load_split
    from iterwego.data.synth import ceilings_from_meta
    from iterwego.model import load_run
    from iterwego.training.evaluator import Evaluator

    splits = ("val", "test")
    stories = {s: load_split(data, s) for s in splits}
    ceilings = {s: _ceilings(c) for s, c in ceilings_from_meta(data).items() if s in splits}
    out: dict = {}
    for name, ov in variants.items():
        model, _ = load_run(run, overrides=ov)
        sets, feats = build_features(
            model.encoders(),
            stories,
            cache=FeatureCache(FeatureCache.default_root()),
            dtype=model.cfg.encoder.feature_dtype,
        )
        ev = {s: Evaluator(sets[s], feats, seed=model.cfg.train.seed + 2)(model) for s in splits}
        chosen = ev["val"].choose_rounds()
        out[name] = {}
        for s in splits:
            rep = ev[s].report(chosen)
            pmr = {
                "unimodal img": rep["image"]["unimodal"]["pmr"],
                "unimodal txt": rep["text"]["unimodal"]["pmr"],
                "guided img": rep["image"]["guided"]["pmr"],
                "guided txt": rep["text"]["guided"]["pmr"],
                "fused img": rep["fused"]["pmr"],
                "fused txt": rep["fused_text"]["pmr"],
            }
            c = ceilings[s]
            out[name][s] = {
                "pmr": pmr,
                "ceilings": c,
                "fused share img": pmr["fused img"] / c["fused_image"],
                "fused share txt": pmr["fused txt"] / c["fused_text"],
                "unimodal share img": pmr["unimodal img"] / c["image"],
                "unimodal share txt": pmr["unimodal txt"] / c["text"],
                "alignment": ev[s].alignment_accuracy,
            }
    return out


def _ceilings(c: dict) -> dict:
    """A split's ceilings: each modality alone, item-level fusion, and the bounds for orders using both
    modalities per side (the fusion ceiling, or with narrating sentences synth.narrating_bounds)."""
    out = {"image": c["image_pmr"], "text": c["text_pmr"], "fused": c["fused_pmr"]}
    for m in ("image", "text"):
        out[f"fused_{m}"] = c.get(f"fused_{m}_bound_pmr", c["fused_pmr"])
    return out


def summary(per_seed: list[dict], key) -> tuple[float, float]:
    """(mean, max − min) over seeds of ``key(entry)``."""
    xs = np.array([key(e) for e in per_seed], dtype=float)
    return float(xs.mean()), float(xs.max() - xs.min())


def print_table(results: dict, split: str, variants: list[str]) -> None:
    head = f"{'family':6s} {'narr':>5s} {'variant':13s} {'align':>6s}" + "".join(f"{c:>14s}" for c in COLUMNS)
    print(f"\n{split} split: PMR, mean over seeds (spread: max - min); fused PMR as a share of its bound\n{head}")
    for key, runs in results.items():
        fam, narrate = key.split("/")
        for v in variants:
            per = [r[v][split] for r in runs.values()]
            al, _ = summary(per, lambda e: 100 * e["alignment"])
            cells = []
            for c in COLUMNS:
                m, sp = summary(per, lambda e: 100 * e["pmr"][c])
                cells.append(f"{m:7.1f} ±{sp:4.1f}")
            si, _ = summary(per, lambda e: 100 * e["fused share img"])
            st, _ = summary(per, lambda e: 100 * e["fused share txt"])
            print(f"{fam:6s} {narrate:>5s} {v:13s} {al:6.1f}" + "".join(f"{c:>14s}" for c in cells)
                  + f"   share {si:5.1f} / {st:5.1f}")  # fmt: skip


def markdown(results: dict, split: str, variants: list[str]) -> str:
    """The table as Markdown: one row per family, narrating share and variant; mean ± spread of PMR per column."""
    cols = ("align", *COLUMNS, "fused / bound img", "fused / bound txt")
    lines = ["| family | narrate | variant | " + " | ".join(cols) + " |", "|---|---:|---|" + "---:|" * len(cols)]
    for key, runs in results.items():
        fam, narrate = key.split("/")
        for v in variants:
            per = [r[v][split] for r in runs.values()]
            cells = [f"{summary(per, lambda e: 100 * e['alignment'])[0]:.1f}"]
            for c in COLUMNS:
                m, sp = summary(per, lambda e: 100 * e["pmr"][c])
                cells.append(f"{m:.1f} ± {sp:.1f}")
            cells += [f"{summary(per, lambda e: 100 * e[f'fused share {m}'])[0]:.1f}" for m in ("img", "txt")]
            lines.append(f"| {fam} | {narrate} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="fusion-work", help="demo runs live here, reused (default ./fusion-work)")
    p.add_argument("--families", nargs="+", default=["tank", "sky"])
    p.add_argument("--narrate", nargs="+", type=float, default=[0.0, 0.5], help="narrating shares (default 0 0.5)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--split", default="val", choices=["val", "test"], help="the split the table prints")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training overrides")
    p.add_argument("--no-train", action="store_true", help="measure the runs already trained, train none")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as Markdown")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.work)
    todo = [(f, n, s) for n in a.narrate for f in a.families for s in a.seeds]
    if a.no_train:
        todo = [x for x in todo if (run_dir(work, *x) / "run" / "model.safetensors").is_file()]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda x: train(run_dir(work, *x), *x, a.threads, a.set), todo))
    variants = {v: VARIANTS[v] for v in a.variants}
    results: dict = {}
    for f, n, s in todo:
        results.setdefault(f"{f}/{n:g}", {})[str(s)] = measure_cached(run_dir(work, f, n, s), variants)
    print_table(results, a.split, a.variants)
    print(f"\ntotal {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"variants": variants, "results": results}, indent=2) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(markdown(results, a.split, a.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
