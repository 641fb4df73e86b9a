"""Wall time of ``iterwego demo`` for this tree against another source tree, side by side in one run.

Each demo runs in a fresh process with a fresh feature cache (the README's "cold feature cache" time), the two
trees alternating (A B B A ...), so a machine that slows down mid-run weighs on both alike. Prints each time, the
means and the ratio this tree / baseline; ``--json`` writes them.

    git worktree add /tmp/iterwego-0.3 760d455   # 0.3.0, or any checkout: its src/ goes first on PYTHONPATH
    python benchmarks/demo_time.py --baseline /tmp/iterwego-0.3/src [--repeats 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def demo_seconds(src: Path, extra: list[str]) -> tuple[float, str]:
    """One ``iterwego demo`` from ``src`` in a fresh process and a fresh cache: its wall time in seconds, and
    what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "iterwego", "demo", "--out", f"{tmp}/out", "--cache-dir", f"{tmp}/cache"]
        t0 = time.perf_counter()
        done = subprocess.run([*cmd, "--quiet", *extra], check=True, env=env, capture_output=True, text=True)
        return time.perf_counter() - t0, done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="the other tree's src/ directory")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (default 1: A then B)")
    p.add_argument("--json", default=None)
    p.add_argument("--printed", default=None, metavar="FILE", help="write what this tree's last demo printed")
    p.add_argument("demo_args", nargs="*", help="extra arguments for both demos (after --)")
    a = p.parse_args(argv)
    trees = {"this tree": HERE, "baseline": Path(a.baseline).resolve()}
    times: dict[str, list[float]] = {k: [] for k in trees}
    for r in range(a.repeats):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
            seconds, printed = demo_seconds(trees[name], a.demo_args)
            times[name].append(seconds)
            print(f"{name:10s} {seconds:7.1f} s", flush=True)
            if name == "this tree" and a.printed:
                Path(a.printed).write_text(printed)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratio = mean["this tree"] / mean["baseline"]
    print(f"mean: this tree {mean['this tree']:.1f} s, baseline {mean['baseline']:.1f} s; ratio {ratio:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"times": times, "mean": mean, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
