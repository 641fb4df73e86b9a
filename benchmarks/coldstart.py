"""Cold start of ``iterwego order`` against ``python -c "import torch"``, measured side by side.

Usage::

    python benchmarks/coldstart.py [--run RUN [--data DATA]] [--repeats 5] [--serve] [--json OUT]

Each repeat starts a fresh ``python -c "import torch"`` and a fresh ``python -m iterwego order --run RUN
--images (5) --sentences (5)``, one after the other, so both see the same load; the table gives medians and the
ratio of the medians. Its parts come from separate cold processes of this script (``--child``), which run the
order command's steps through the library and time them: imports (the command's modules), model load
(``load_run``, backbones included), then one ``order_stories`` call profiled into features (``build_features``),
forward (``IterWeGO.forward``) and decode (``decode_story``). ``--serve`` also times ``iterwego serve`` from
start to its first answered ``POST /api/order``.

Without ``--run`` a small tiny-preset run is trained first on 20 synthetic stories (about a minute); the album
is 5 images and 5 sentences of the data's test split (``--data``; default: ``RUN/../data`` if it exists, as
``iterwego demo`` lays it out). Files stay in the OS cache between repeats (a process is cold, the disk is not).
Timings move with other work on the machine: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TORCH_LABEL = 'python -c "import torch"'
PARTS = ("imports", "model load", "features", "forward", "decode", "order (all of it)")
#: how profiled functions map to the parts (function name, file name ending)
PROFILED = {"features": ("build_features", "features.py"), "forward": ("forward", "model.py")}
PROFILED["decode"] = ("decode_story", "decode.py")
TRAIN_SET = [
    "train.unimodal_epochs=2",
    "train.iterative_epochs=1",
    "aligner.epochs=1",
    "fusion.epochs=1",
    "train.early_stop=0",
    "encoder.cnn_width=8",
    "orderer.d_model=32",
    "orderer.heads=2",
    "orderer.ffn=64",
    "aligner.dim=16",
]


def _cli(*args: str) -> list[str]:
    return [PY, "-m", "iterwego", *args]


def small_run(root: Path) -> tuple[Path, Path]:
    """Synthesise 20 stories and train a small tiny-preset run on them; returns ``(run, data)``."""
    data, run = root / "data", root / "run"
    subprocess.run(_cli("synth", str(data), "--stories", "20", "--seed", "3", "--quiet"), env=ENV, check=True)
    sets = [x for s in TRAIN_SET for x in ("--set", s)]
    cmd = _cli("train", "--data", str(data), "--out", str(run), "--quiet", "--no-cache", *sets)
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return run, data


def album(data: Path, n: int = 5) -> tuple[list[str], list[str]]:
    """``n`` images and ``n`` sentences of the test split (their order does not matter to the timing)."""
    doc = json.loads((data / "test.story-in-sequence.json").read_text())
    sentences = [a[0]["text"] for a in doc["annotations"]][:n]
    images = sorted(str(p) for p in (data / "images" / "test").iterdir())[:n]
    if len(images) < n or len(sentences) < n:
        raise SystemExit(f"{data}: the test split holds fewer than {n} images or sentences")
    return images, sentences


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def child(run: str, images: list[str], sentences: list[str]) -> None:
    """One cold process: the order command's steps, timed; prints one JSON line."""
    t0 = time.perf_counter()
    import cProfile
    import pstats

    import torch

    from iterwego.apps import cli, commands, order  # noqa: F401  (what `iterwego order` imports)
    from iterwego.device import pick_device
    from iterwego.model import load_run

    t1 = time.perf_counter()
    model, meta = load_run(run, pick_device())
    t2 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    stories = order.stories_from_args(images, sentences)
    order.order_stories(model, stories, chosen_rounds=meta.get("chosen_rounds"), decoder=model.cfg.train.decoder)
    prof.disable()
    t3 = time.perf_counter()
    stats = pstats.Stats(prof).stats
    parts = {"imports": t1 - t0, "model load": t2 - t1, "order (all of it)": t3 - t2}
    for part, (fn, file) in PROFILED.items():
        parts[part] = sum(v[3] for (f, _, name), v in stats.items() if name == fn and f.endswith(file))
    print(json.dumps({"parts": parts, "threads": torch.get_num_threads()}))


def serve_first_answer(run: str, images: list[str], sentences: list[str]) -> float:
    """Seconds from starting ``iterwego serve`` to its first answered order."""
    import base64
    import urllib.request

    payload = {
        "images": [{"name": Path(p).name, "data": base64.b64encode(Path(p).read_bytes()).decode()} for p in images],
        "sentences": sentences,
    }
    t0 = time.perf_counter()
    cmd = _cli("serve", "--run", run, "--port", "0", "--quiet")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "ready at " in line:
                url = line.split("ready at ", 1)[1].split()[0].rstrip("/")
                break
        else:
            raise SystemExit("iterwego serve exited before it was ready")
        req = urllib.request.Request(
            url + "/api/order", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            json.loads(r.read())
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait()


def machine() -> dict:
    """CPU model (lscpu), logical CPUs and the 1-minute load average."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "?")
    except OSError:
        cpu = "?"
    return {"cpu": cpu, "cpus": os.cpu_count(), "load": os.getloadavg()[0], "omp": os.environ.get("OMP_NUM_THREADS")}


def measure(run: str, images: list[str], sentences: list[str], repeats: int, serve: bool) -> dict:
    before = machine()["load"]
    torch_s, order_s, parts, serve_s, threads = [], [], [], [], None
    order_cmd = _cli("order", "--run", run, "--images", *images, "--sentences", *sentences)
    for _ in range(repeats):  # side by side: each repeat times both, one after the other
        torch_s.append(timed([PY, "-c", "import torch"]))
        order_s.append(timed(order_cmd))
        out = subprocess.run(
            [PY, __file__, "--child", run, "--images", *images, "--sentences", *sentences],
            env=ENV,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SystemExit(f"the timing child failed:\n{out.stderr[-2000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        parts.append(got["parts"])
        threads = got["threads"]
        if serve:
            serve_s.append(serve_first_answer(run, images, sentences))
    med = statistics.median
    res = {
        "machine": {**machine(), "load_before": before, "torch_threads": threads},
        "repeats": repeats,
        "import_torch_s": med(torch_s),
        "order_s": med(order_s),
        "ratio": med(order_s) / med(torch_s),
        # steadier than the ratio of medians when the machine's load drifts between repeats
        "ratio_per_repeat": med(o / t for o, t in zip(order_s, torch_s)),
        "parts_s": {p: med(x[p] for x in parts) for p in PARTS},
        "all_s": {"import_torch": torch_s, "order": order_s, "serve": serve_s},
    }
    if serve:
        res["serve_first_answer_s"] = med(serve_s)
        res["serve_ratio"] = med(serve_s) / med(torch_s)
        res["serve_ratio_per_repeat"] = med(v / t for v, t in zip(serve_s, torch_s))
    return res


def table(res: dict) -> str:
    m = res["machine"]
    rows = [
        f"cold start of `iterwego order` (5 images, 5 sentences), median of {res['repeats']} side-by-side repeats",
        f"CPU: {m['cpu']}, {m['cpus']} logical CPUs, torch threads {m['torch_threads']}; "
        f"load average {m['load_before']:.2f} before, {m['load']:.2f} after",
        f"{TORCH_LABEL:<34}{res['import_torch_s']:>8.2f} s",
        f"{'iterwego order':<34}{res['order_s']:>8.2f} s",
        f"{'ratio (goal <= 1.5)':<34}{res['ratio']:>8.2f}",
        f"{'  median of per-repeat ratios':<34}{res['ratio_per_repeat']:>8.2f}",
    ]
    if "serve_ratio" in res:
        rows.append(f"{'iterwego serve, first answer':<34}{res['serve_first_answer_s']:>8.2f} s")
        rows.append(f"{'serve ratio (goal <= 2)':<34}{res['serve_ratio']:>8.2f}")
        rows.append(f"{'  median of per-repeat ratios':<34}{res['serve_ratio_per_repeat']:>8.2f}")
    rows.append("parts, in a separate cold process (median):")
    rows += [f"  {p:<32}{res['parts_s'][p]:>8.3f} s" for p in PARTS]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained run (default: train a small tiny one first)")
    p.add_argument("--data", help="synthetic data to take the album from (default: RUN/../data)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--serve", action="store_true", help="also time `iterwego serve` up to its first answer")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--child", metavar="RUN", help=argparse.SUPPRESS)
    p.add_argument("--images", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--sentences", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.images, a.sentences)
        return 0
    with tempfile.TemporaryDirectory(prefix="iterwego-coldstart-") as tmp:
        if a.run:
            run, data = Path(a.run), Path(a.data) if a.data else Path(a.run).parent / "data"
        else:
            print("training a small tiny-preset run first (about a minute)", flush=True)
            run, data = small_run(Path(tmp))
        images, sentences = album(data)
        res = measure(str(run), images, sentences, a.repeats, a.serve)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
