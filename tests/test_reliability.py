"""Reliability: crash safety, divergence, disk-full checkpoints, determinism across processes, atomic writes.

tests/test_resume_order.py kills training once at each of two fixed points; here one training is
killed three times in a row (SIGKILL at seeded-random log lines, one in each stage group), every
restart is itself a `--resume`, and the end result must equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import iterwego.training.recipe as train_mod
from iterwego.apps.cli import main
from iterwego.data.synth import SynthConfig, synthesize
from iterwego.errors import WriteError
from iterwego.io import atomic_write_bytes

TRAIN_ARGS = [
    "--quiet",
    "--set",
    "train.unimodal_epochs=2",
    "--set",
    "train.iterative_epochs=2",
    "--set",
    "aligner.epochs=2",
    "--set",
    "encoder.image_size=32",
    "--set",
    "train.num_threads=1",
    "--set",
    "train.early_stop=0",
]
# log.jsonl lines of one run with TRAIN_ARGS: 1-2 unimodal-image, 3-4 unimodal-text, 5-6 aligner,
# 7 iterative epoch -1 (before guided training), 8-9 iterative epochs 0 and 1.
STAGE_LINES = {"unimodal": (2, 4), "aligner": (5, 6), "iterative": (7, 8)}  # from 2: a checkpoint exists by then
KILL_SEED = 7  # gives kill points [3, 5, 8]: unimodal-text epoch 0, aligner epoch 0, iterative epoch 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reliability") / "data"
    synthesize(d, SynthConfig(stories=20, seed=11, image_size=32), progress=False)
    return d


def _evaluate(run: Path, data: Path, out: Path) -> dict:
    assert main(["evaluate", "--data", str(data), "--run", str(run), "--quiet", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run, trained in this process, and its test metrics."""
    threads = torch.get_num_threads()
    try:
        root = tmp_path_factory.mktemp("reference")
        run = root / "run"
        assert main(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS]) == 0
        yield {"run": run, "metrics": _evaluate(run, data, root / "metrics.json")}
    finally:
        torch.set_num_threads(threads)


def _env(hash_seed: int) -> dict:
    # a different hash seed per process: set/dict iteration order must not leak into the arithmetic
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": str(hash_seed)}


from test_resume_order import _log_lines  # noqa: E402  (shared with the 2-point resume test)
from test_resume_order import _train_cmd as _cmd  # noqa: E402


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()  # every loss and validation metric
    ma, mb = (json.loads((r / "meta.json").read_text()) for r in (a, b))
    assert ma["chosen_rounds"] == mb["chosen_rounds"]


def test_three_sigkills_then_resume_equal_an_uninterrupted_run(data, reference, tmp_path):
    rng = random.Random(KILL_SEED)
    points = [rng.randint(lo, hi) for lo, hi in STAGE_LINES.values()]
    run = tmp_path / "run"
    cmd = _cmd("--data", str(data), "--out", str(run), *TRAIN_ARGS)
    for i, k in enumerate(points):
        p = subprocess.Popen(cmd, env=_env(101 + i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while _log_lines(run) < k and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, (
            f"kill {i + 1} at log line {k} (points {points}) came too late: exit {p.returncode}, {p.stderr.read()!r}"
        )
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        assert (run / "train_state.pt").is_file(), f"no checkpoint after the kill at line {k}"
        assert not (run / "model.safetensors").exists()
        cmd = _cmd("--resume", str(run), "--quiet")  # every restart after the first kill is a resume
    r = subprocess.run(cmd, env=_env(200), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _assert_same_run(reference["run"], run)
    assert _evaluate(run, data, tmp_path / "metrics.json") == reference["metrics"]


def test_same_seed_gives_identical_metrics_in_a_fresh_process(data, reference, tmp_path):
    """tests/test_train_smoke.py trains twice in one process; this run is another interpreter with another hash seed."""
    run = tmp_path / "run"
    r = subprocess.run(
        _cmd("--data", str(data), "--out", str(run), *TRAIN_ARGS),
        env=_env(7),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert _evaluate(run, data, tmp_path / "metrics.json") == reference["metrics"]
    _assert_same_run(reference["run"], run)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = train_mod.pair_loss

    def poisoned(*a, **kw):
        loss = real(*a, **kw)
        # training steps (not validation) go bad once the first checkpoint exists
        return loss * float("nan") if torch.is_grad_enabled() and (run / "train_state.pt").exists() else loss

    monkeypatch.setattr(train_mod, "pair_loss", poisoned)
    capsys.readouterr()
    rc = main(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert (
        "loss became nan at unimodal image epoch 1 step 0" in err[0]
        and str(run) in err[0]
        and "Traceback" not in err[0]
    )
    assert not (run / "model.safetensors").exists()
    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)
    assert (state["stage"], state["epoch"]) == ("unimodal-image", 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [0]


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(data, tmp_path, monkeypatch, capsys):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file is being synced")
    run = tmp_path / "run"
    real_fsync, seen = os.fsync, []

    def full_disk(fd: int) -> None:
        if ".train_state.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) == 2:  # the first checkpoint lands, the second finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    rc = main(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(run / "train_state.pt") in err[0] and "No space left on device" in err[0]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)
    assert (state["stage"], state["epoch"]) == ("unimodal-image", 0)


# --------------------------------------------------------------------------- atomic writes
class _HalfWriter:
    """A file object that writes half of what it is given, then fails like a full disk (or an interrupt)."""

    def __init__(self, f, exc: BaseException):
        self.f, self.exc = f, exc

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["enospc", "interrupt"]
)
def test_exception_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old weights")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _HalfWriter(real_fdopen(fd, *a, **k), exc))
    with pytest.raises(type(exc)) as caught:
        atomic_write_bytes(target, b"new weights " * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    if isinstance(exc, OSError):  # one line for the CLI, still an OSError with its errno for callers
        assert isinstance(caught.value, WriteError) and caught.value.errno == errno.ENOSPC
        assert str(target) in str(caught.value) and "\n" not in str(caught.value)
    else:
        assert type(caught.value) is KeyboardInterrupt  # interrupts are not turned into errors


def test_unwritable_directory_is_a_one_line_write_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="cannot write") as caught:
        atomic_write_bytes(tmp_path / "file" / "meta.json", b"{}")
    assert str(tmp_path / "file" / "meta.json") in str(caught.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=256), new=st.binary(max_size=4096))
def test_atomic_write_replaces_content_exactly(tmp_path, old, new):
    target = tmp_path / "prop" / "f.bin"
    atomic_write_bytes(target, old)
    atomic_write_bytes(target, new)
    assert target.read_bytes() == new
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
