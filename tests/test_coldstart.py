"""benchmarks/coldstart.py end to end on the session's run (off by default: -m benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COLDSTART = Path(__file__).resolve().parents[1] / "benchmarks" / "coldstart.py"


@pytest.mark.benchmark
def test_coldstart_prints_the_ratio_and_its_parts(trained_run, tmp_path):
    out = tmp_path / "coldstart.json"
    cmd = [sys.executable, str(COLDSTART), "--run", str(trained_run.run), "--data", str(trained_run.data)]
    proc = subprocess.run(
        [*cmd, "--repeats", "1", "--serve", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("ratio (goal <= 1.5)", "serve ratio (goal <= 2)", "CPU:", "torch threads", "model load", "decode"):
        assert label in proc.stdout, label
    res = json.loads(out.read_text())
    assert res["ratio"] == pytest.approx(res["order_s"] / res["import_torch_s"])
    assert 0 < res["import_torch_s"] and res["parts_s"]["features"] > 0 and res["parts_s"]["forward"] > 0
    # the profiled steps happen inside the order call they are part of
    parts = res["parts_s"]
    assert parts["features"] + parts["forward"] + parts["decode"] <= parts["order (all of it)"] * 1.05
