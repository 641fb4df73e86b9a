"""Data-parallel training: 2 gloo processes equal 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from iterwego.data.synth import SynthConfig, synthesize

# A small learning rate keeps parity measurable: Adam turns pure float-noise gradients (attention key biases
# have an exactly zero true gradient) into lr-sized steps, and the guidance threshold is discontinuous, so at
# large rates 1e-7 differences in summation order grow; at 1e-5 both stay far below the 1e-6 tolerance.
ARGS = [
    "--quiet",
    "--set",
    "train.unimodal_epochs=1",
    "--set",
    "train.iterative_epochs=1",
    "--set",
    "aligner.epochs=1",
    "--set",
    "encoder.image_size=32",
    "--set",
    "train.num_threads=1",
    "--set",
    "orderer.dropout=0",
    "--set",
    "train.early_stop=0",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.lr=1e-5",
    "--set",
    "train.eval_batch_size=3",
]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_gloo_processes_match_one(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(stories=40, seed=11, image_size=32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "iterwego", "train", "--data", str(data), "--out", str(tmp_path / "one"), *ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "iterwego",
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "two"),
            *ARGS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    # rank 0 alone wrote the run; validation metrics, evaluated in shards and gathered, equal one process's
    import json

    one_log = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two_log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in one_log] == [(e["stage"], e["epoch"]) for e in two_log]
    for e1, e2 in zip(one_log, two_log):
        for k, v in e1.get("val", {}).items():
            if isinstance(v, float):
                assert abs(v - e2["val"][k]) <= 1e-6, (e1["stage"], k)
            else:
                assert v == e2["val"][k], (e1["stage"], k)
