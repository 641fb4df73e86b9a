"""Reliability: crash safety, divergence, disk-full checkpoints, determinism across processes, atomic writes.

One training is killed four times in a row (SIGKILL at seeded-random log lines, one in each stage group:
unimodal, aligner, iterative, heads), every restart after the first is itself a `--resume`, and the end result must
equal the uninterrupted shared run (tests/conftest.py) bit for bit. The killed attempts are forked from this
process: a SIGKILL leaves no chance to clean up either way, and a fork skips a 3-5 s interpreter start. A whole
run in a fresh interpreter with another hash seed must equal the shared run too.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iterwego.training.recipe as train_mod
from conftest import TRAIN_ARGS, assert_same_run, evaluate_json, fork_cli
from iterwego.apps.cli import main
from iterwego.errors import WriteError
from iterwego.io import atomic_write_bytes

# log.jsonl lines of the shared run (conftest.TRAIN_ARGS): 1-2 unimodal-image, 3-4 unimodal-text, 5-6 aligner,
# 7 iterative epoch -1 (before guided training), 8-9 iterative epochs 0 and 1, 10-11 heads epochs 0 and 1.
STAGE_LINES = {"unimodal": (2, 4), "aligner": (5, 6), "iterative": (7, 8), "heads": (10, 10)}  # from 2: a checkpoint
KILL_SEED = 7  # gives kill points [3, 5, 8, 10]: unimodal-text epoch 0, aligner epoch 0, iterative and heads epoch 0


@pytest.fixture
def data(trained_run) -> Path:
    return trained_run.data


@pytest.fixture
def train_args(trained_run) -> list[str]:
    return trained_run.args


def _env(hash_seed: int) -> dict:
    # a different hash seed per process: set/dict iteration order must not leak into the arithmetic
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": str(hash_seed)}


def _cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "iterwego", *args]


def _log_lines(run: Path) -> int:
    try:
        return len((run / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_at_line(pid: int, run: Path, k: int, what: str) -> None:
    """SIGKILL the child once ``run``'s log has ``k`` lines; fail if it exited before."""
    deadline = time.time() + 180
    exited = None
    while _log_lines(run) < k and time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.005)
    if exited is None:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        exited = os.waitstatus_to_exitcode(status)
    assert exited == -signal.SIGKILL, f"{what} came too late: the training exited with {exited}"


def test_four_sigkills_then_resume_equal_an_uninterrupted_run(trained_run, data, train_args, tmp_path, capsys):
    rng = random.Random(KILL_SEED)
    points = [rng.randint(lo, hi) for lo, hi in STAGE_LINES.values()]
    assert points == [3, 5, 8, 10]  # one kill in each stage group (a new seed must keep that)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *train_args]
    for i, k in enumerate(points):
        _kill_at_line(fork_cli(argv), run, k, f"kill {i + 1} at log line {k} (points {points})")
        assert (run / "train_state.pt").is_file(), f"no checkpoint after the kill at line {k}"
        assert not (run / "model.safetensors").exists()
        argv = ["train", "--resume", str(run), "--quiet"]  # every restart after the first kill is a resume
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err  # the last resume runs to the end, here
    assert not list(run.glob(".*.tmp"))  # the resume swept what the kills left half-written
    assert_same_run(trained_run.run, run)
    assert evaluate_json(run, data, tmp_path / "metrics.json") == trained_run.metrics


def _fresh_process(data: Path, out: Path) -> tuple[list[str], dict]:
    return _cli_cmd("train", "--data", str(data), "--out", str(out), *TRAIN_ARGS), _env(7)


@pytest.mark.early_start("fresh-process-train", _fresh_process)
def test_same_seed_gives_identical_metrics_in_a_fresh_process(trained_run, early_runs, tmp_path):
    """tests/test_train_smoke.py trains twice in one process; this run is another interpreter with another hash seed
    (started with the session, see conftest.early_runs)."""
    run = early_runs["fresh-process-train"]
    r = run.wait()
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(trained_run.run, run.out)
    assert evaluate_json(run.out, trained_run.data, tmp_path / "metrics.json") == trained_run.metrics


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(data, train_args, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = train_mod.pair_loss

    def poisoned(*a, **kw):
        loss = real(*a, **kw)
        # training steps (not validation) go bad once the first checkpoint exists
        return loss * float("nan") if torch.is_grad_enabled() and (run / "train_state.pt").exists() else loss

    monkeypatch.setattr(train_mod, "pair_loss", poisoned)
    capsys.readouterr()
    rc = main(["train", "--data", str(data), "--out", str(run), *train_args])
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


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(data, train_args, tmp_path, monkeypatch, capsys):
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
    rc = main(["train", "--data", str(data), "--out", str(run), *train_args])
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
