"""SIND-size training on one machine: store build time, epoch time per stage, peak RSS and store size per size.

Usage::

    python benchmarks/scale.py [--sizes 10000 20000 40000] [--json OUT] [--work DIR] [--threads T]

For every size it trains ``iterwego``'s ``tiny`` image path (the cnn on 32-px pixels) with the token-level
text path (all-MiniLM-L6-v2's hidden states stored per token, its top ``--text-layers`` layer(s) training as
``paper`` trains BERT's top two), one epoch of each stage (unimodal image, unimodal text, aligner,
iterative), on SIND-shaped synthetic data: stories of 5 items, ``N`` training stories plus validation and
test splits of ``--val`` / ``--test`` stories, in SIND's JSON layout.

Every image and every sentence is distinct, as in SIND, where almost no caption repeats, so nothing is saved
by deduplication: each sentence (8 to 15 words) carries a unique number and each image unique pixels. A
position cue (a sentence's first word, a bar in the image) is shown with probability 0.6 so the models have
something to learn.

Each size trains in a fresh child process with a fresh feature store (``TrainRecipe`` with a
``FeatureCache`` of its own), so the store is built cold and the peak RSS (``ru_maxrss`` of that process,
from ``wait4``) is the training process's alone. Times are wall seconds and CPU seconds (all threads) of the
training pass of each stage's epoch, validation apart: validation runs on the same 1,000 stories at every
size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("unimodal-image", "unimodal-text", "aligner", "iterative")
CUES = ("first", "then", "next", "later", "finally")
WORDS = (
    "the a we our my family friends kids dog cat boat house park beach tree road city garden lake river "
    "morning evening night day weekend party dinner lunch trip walk game cake music dance photo picture view "
    "old new small big happy tired little great beautiful sunny cold warm red blue green together again "
    "walked played looked waited stopped arrived visited enjoyed watched found saw took made went had got "
    "near under after before into around with from at on by for of to in"
).split()
ITEMS = 5  # SIND stories have 5 photos and 5 sentences


# --------------------------------------------------------------------------- data
def sentence(rng: np.random.Generator, uid: int, pos: int) -> str:
    """8-15 words, lower-cased and tokenised like SIND's ``text``; ``uid`` makes it unique."""
    n = int(rng.integers(8, 16))
    first = CUES[pos] if rng.random() < 0.6 else str(rng.choice(WORDS))
    words = [first, str(rng.choice(WORDS)), "number", str(uid), *rng.choice(WORDS, n - 4)]
    return " ".join(words) + " ."


def image(rng: np.random.Generator, uid: int, pos: int, size: int) -> np.ndarray:
    """Noise with the item's id in its first pixels (unique pixels) and, 60 % of the time, a position bar."""
    px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    px[0, :4, 0] = np.frombuffer(int(uid).to_bytes(4, "little"), np.uint8)
    if rng.random() < 0.6:
        px[size // 2 : size // 2 + 4, : (pos + 1) * size // ITEMS] = 255
    return px


def write_split(root: Path, split: str, first_uid: int, stories: int, seed: int, size: int) -> None:
    """``root/{split}.story-in-sequence.json`` and ``root/images/{split}/<photo id>.png``, SIND's layout."""
    from PIL import Image

    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for s in range(stories):
        rng = np.random.default_rng([seed, first_uid + s])
        for pos in range(ITEMS):
            uid = (first_uid + s) * ITEMS + pos
            pid = f"{uid:09d}"
            Image.fromarray(image(rng, uid, pos, size)).save(img_dir / f"{pid}.png", compress_level=1)
            text = sentence(rng, uid, pos)
            anns.append(
                [
                    {
                        "story_id": f"{split}{first_uid + s}",
                        "album_id": f"album{first_uid + s}",
                        "photo_flickr_id": pid,
                        "storylet_id": str(uid),
                        "worker_arranged_photo_order": pos,
                        "text": text,
                        "original_text": text.capitalize(),
                        "setting": "first-2-pick-and-tell",
                    }
                ]
            )
    doc = {"images": [], "albums": [], "annotations": anns, "info": {}, "type": "story_in_sequence"}
    (root / f"{split}.story-in-sequence.json").write_text(json.dumps(doc))


def subset(pool: Path, out: Path, train: int) -> None:
    """A dataset of the pool's first ``train`` training stories (images hard-linked), val and test as they are."""
    out.mkdir(parents=True, exist_ok=True)
    doc = json.loads((pool / "train.story-in-sequence.json").read_text())
    doc["annotations"] = doc["annotations"][: train * ITEMS]
    (out / "train.story-in-sequence.json").write_text(json.dumps(doc))
    for split in ("val", "test"):
        _link(pool / f"{split}.story-in-sequence.json", out / f"{split}.story-in-sequence.json")
    for split in ("train", "val", "test"):
        d = out / "images" / split
        d.mkdir(parents=True, exist_ok=True)
    for a in doc["annotations"]:
        name = f"{a[0]['photo_flickr_id']}.png"
        _link(pool / "images" / "train" / name, out / "images" / "train" / name)
    for split in ("val", "test"):
        for f in (pool / "images" / split).iterdir():
            _link(f, out / "images" / split / f.name)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def make_data(work: Path, sizes: list[int], val: int, test: int, size: int, seed: int) -> dict[int, Path]:
    pool = work / "pool"
    done = pool / ".complete"
    spec = f"{max(sizes)} {val} {test} {size} {seed}"
    if not (done.exists() and done.read_text() == spec):
        shutil.rmtree(pool, ignore_errors=True)
        t = time.time()
        write_split(pool, "train", 0, max(sizes), seed, size)
        write_split(pool, "val", 10**7, val, seed, size)
        write_split(pool, "test", 2 * 10**7, test, seed, size)
        done.write_text(spec)
        print(f"synthesised {max(sizes)} + {val} + {test} stories in {time.time() - t:.0f} s", flush=True)
    out = {}
    for n in sizes:
        d = work / f"data-{n}"
        if n == max(sizes):
            d = pool
        else:
            subset(pool, d, n)
        out[n] = d
    return out


# --------------------------------------------------------------------------- one size, in a child process
def overrides(args) -> list[str]:
    return [
        "encoder.text=minilm",
        f"encoder.text_train_layers={args.text_layers}",
        f"encoder.text_max_length={args.text_max_length}",
        "encoder.image=cnn",
        f"encoder.image_size={args.image_size}",
        f"encoder.feature_dtype={args.dtype}",
        "train.unimodal_epochs=1",
        "train.iterative_epochs=1",
        "aligner.epochs=1",
        "train.early_stop=0",
        f"train.num_threads={args.threads}",
        f"train.seed={args.seed}",
    ]


def child(spec: dict) -> dict:
    """Train one size; runs in its own process (``--child SPEC``)."""
    import torch

    from iterwego.config import preset
    from iterwego.data.cache import FeatureCache
    from iterwego.training.recipe import TrainRecipe

    cfg = preset("tiny").override(spec["overrides"])
    cache = FeatureCache(spec["store"])
    t0 = time.perf_counter()
    recipe = TrainRecipe(cfg, spec["data"], spec["run"], progress=False, log=lambda *a: None, cache=cache)
    try:
        recipe.setup()
        setup_s = time.perf_counter() - t0
        hwm_setup = _vm_hwm_mib()
        recipe.train().save()
    finally:
        recipe.cleanup()
    store_bytes = sum(f.stat().st_size for f in Path(spec["store"]).rglob("*.safetensors"))
    return {
        "train_stories": len(recipe.train_stories),
        "val_stories": len(recipe.val_stories),
        "setup_s": setup_s,
        "features": recipe.timings["features"],
        "epochs": recipe.timings["epochs"],
        "store_bytes": store_bytes,
        "peak_rss_after_setup_mib": hwm_setup,
        "truncated_sentences": recipe.truncated,
        "history": recipe.history,
        "torch_threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - t0,
    }


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_size(args, n: int, data: Path, work: Path) -> dict:
    store, run = work / f"store-{n}", work / f"run-{n}"
    for d in (store, run):
        shutil.rmtree(d, ignore_errors=True)
    spec_path, out_path = work / f"spec-{n}.json", work / f"result-{n}.json"
    spec = {"data": str(data), "store": str(store), "run": str(run), "overrides": overrides(args), "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"size {n}: the training process failed (exit {p.returncode})")
    res = json.loads(out_path.read_text())
    res["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    res["wall_s"] = time.perf_counter() - t
    res["stories"] = n
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- report
def per_stage(res: dict) -> dict[str, dict]:
    """Training-pass and validation seconds (wall, CPU) of each stage's epoch, and ms per training story."""
    out = {}
    for e in res["epochs"]:
        if e["epoch"] < 0:
            continue
        tr, va = e.get("train", {}), e.get("val", {})
        out[e["stage"]] = {
            "train_wall_s": tr.get("wall_s", 0.0),
            "train_cpu_s": tr.get("cpu_s", 0.0),
            "val_wall_s": va.get("wall_s", 0.0),
            "ms_per_story": 1e3 * tr.get("wall_s", 0.0) / res["train_stories"],
            "cpu_ms_per_story": 1e3 * tr.get("cpu_s", 0.0) / res["train_stories"],
        }
    return out


def summarize(results: list[dict]) -> dict:
    base, top = results[0], results[-1]
    flat = {}
    for key in ("ms_per_story", "cpu_ms_per_story"):
        dev = {}
        for st in STAGES:
            ref = base["stages"][st][key]
            dev[st] = max(abs(r["stages"][st][key] / ref - 1) for r in results) if ref else 0.0
        per_epoch = [sum(r["stages"][st][key] for st in STAGES) for r in results]
        dev["all stages"] = max(abs(v / per_epoch[0] - 1) for v in per_epoch)
        flat[key] = dev
    return {
        "peak_rss_ratio_largest_over_smallest": top["peak_rss_mib"] / base["peak_rss_mib"],
        "peak_rss_largest_mib": top["peak_rss_mib"],
        "max_deviation_from_smallest": flat,
    }


def table(r: dict) -> str:
    a = r["args"]
    lines = [
        f"iterwego scale benchmark: SIND-shaped stories of {ITEMS} items, every image and sentence distinct; "
        f"cnn on {a['image_size']}-px pixels, MiniLM tokens (max {a['text_max_length']}, top {a['text_layers']} "
        f"layer training), {a['dtype']} store; one epoch per stage; {r['cpu_cores']} CPU cores, "
        f"{r['results'][0]['torch_threads']} torch threads; validation {a['val']} stories",
        "",
        f"{'train':>7s} {'store':>8s} {'store':>9s} | "
        f"{'training pass of one epoch: s, then ms per story (wall / CPU)':^87s} | {'valid.':>6s} {'peak':>8s}",
        f"{'stories':>7s} {'build':>8s} {'on disk':>9s} | "
        + " ".join(f"{st:>21s}" for st in STAGES)
        + f" | {'s':>6s} {'RSS':>8s}",
    ]
    for res in r["results"]:
        cells = [
            f"{res['stages'][st]['train_wall_s']:5.0f} s {res['stages'][st]['ms_per_story']:5.1f} /"
            f"{res['stages'][st]['cpu_ms_per_story']:5.1f}"
            for st in STAGES
        ]
        val = sum(res["stages"][st]["val_wall_s"] for st in STAGES)
        lines.append(
            f"{res['stories']:>7,d} {res['features']['wall_s']:7.0f}s {res['store_bytes'] / 2**20:6.0f} MiB | "
            + " ".join(f"{c:>21s}" for c in cells)
            + f" | {val:6.0f} {res['peak_rss_mib']:5.0f} MiB"
        )
    s = r["summary"]
    dev = s["max_deviation_from_smallest"]
    pct = lambda key, st: f"{100 * dev[key][st]:.0f} %"  # noqa: E731
    lines.append("")
    lines.append(
        f"peak RSS, largest / smallest: {s['peak_rss_ratio_largest_over_smallest']:.2f}x "
        f"({s['peak_rss_largest_mib']:.0f} MiB); time per story per epoch (all stages), largest deviation from "
        f"the smallest size: wall {pct('ms_per_story', 'all stages')}, CPU {pct('cpu_ms_per_story', 'all stages')}"
    )
    lines.append(
        "per stage, wall: "
        + ", ".join(f"{st} {pct('ms_per_story', st)}" for st in STAGES)
        + "; CPU: "
        + ", ".join(f"{st} {pct('cpu_ms_per_story', st)}" for st in STAGES)
    )
    lines.append(
        f"sentences truncated at {a['text_max_length']} tokens: "
        + ", ".join(f"{res['stories']:,d}: {res['truncated_sentences']:,d}" for res in r["results"])
        + f"; load average {r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end;"
        f" wall time {r['wall_s'] / 60:.0f} min"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000], help="training stories per run")
    ap.add_argument("--val", type=int, default=1000, help="validation stories (default 1000)")
    ap.add_argument("--test", type=int, default=1000, help="test stories (default 1000; not read by training)")
    ap.add_argument("--text-max-length", type=int, default=16, help="tokens per sentence (default 16)")
    ap.add_argument("--text-layers", type=int, default=1, help="MiniLM top layers that train (default 1)")
    ap.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="store dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working directory, kept (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep each size's store and run directory")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        Path(spec["out"]).write_text(json.dumps(child(spec)))
        return 0
    args.sizes = list(dict.fromkeys(args.sizes))  # run in the order given (largest second: the ratio sooner)
    if min(args.sizes) < 1 or args.val < 1 or args.test < 1:
        ap.error("--sizes, --val and --test must be positive")
    t0, load0 = time.time(), os.getloadavg()
    scratch = args.work is None
    work = Path(tempfile.mkdtemp(prefix="iterwego-scale-")) if scratch else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = make_data(work, args.sizes, args.val, args.test, args.image_size, args.seed)
        results = []
        for n in args.sizes:
            res = run_size(args, n, data[n], work)
            res["stages"] = per_stage(res)
            results.append(res)
            print(
                f"{n:,d} stories: store {res['features']['wall_s']:.0f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                f"{res['wall_s']:.0f} s in all",
                flush=True,
            )
            if args.json:  # partial results survive an interrupted run
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if scratch:
            shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: r["stories"])
    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_cores": os.cpu_count(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "results": results,
        "summary": summarize(results),
        "wall_s": time.time() - t0,
    }
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
