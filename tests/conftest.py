import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import shared builders from each other

# Tests never touch the network: Hugging Face loaders must use local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread for the whole session (and the CLI processes it starts): the models here are tiny, and on
# shared cores a second thread only contends. Without this the count depended on which test ran last: every
# training pins train.num_threads, so later tests ran with 1 thread or 2 depending on the order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLI's feature cache defaults to ~/.cache/iterwego; tests keep theirs in a throwaway directory.
import tempfile  # noqa: E402

os.environ["ITERWEGO_CACHE"] = tempfile.mkdtemp(prefix="iterwego-test-cache-")


# --------------------------------------------------------------------------- model fixtures (appended)
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Fail any socket connection; yields the list of attempted addresses (must stay empty)."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network disabled in tests (tried {address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel saved with save_pretrained (vision 32px, patch 8, width 32; projection 16)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("tiny-clip")
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel (width 32, 2 layers) saved next to the MiniLM tokenizer (same vocabulary)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from iterwego.encoders import minilm_dir

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (the machines have 2 shared cores; more threads only contend)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- the one trained run
# Every test that only needs *a* trained run shares this one (trained once per test session, in this process).
# Tests that must train themselves (resume after SIGKILL, determinism, data parallel, NaN loss, disk full) train
# with the same arguments on the same data, so the shared run is their uninterrupted reference.
# log.jsonl of a run with these arguments: lines 1-2 unimodal-image, 3-4 unimodal-text, 5-6 aligner,
# 7 iterative epoch -1 (validation before guided training), 8-9 iterative epochs 0 and 1, 10-11 heads (rank
# heads and fused orderer) epochs 0 and 1.
TRAIN_ARGS = [
    "--quiet",
    "--set", "train.unimodal_epochs=2",
    "--set", "train.iterative_epochs=2",
    "--set", "aligner.epochs=2",
    "--set", "fusion.epochs=2",
    "--set", "train.early_stop=0",
    "--set", "train.num_threads=1",
    "--set", "encoder.image_size=32",
    "--set", "encoder.cnn_width=8",
    "--set", "orderer.d_model=32",
    "--set", "orderer.heads=2",
    "--set", "orderer.ffn=64",
    "--set", "aligner.dim=16",
]  # fmt: skip
LONG_SENTENCE = " ".join(["word"] * 10_000)


def add_training_edge_cases(data: Path) -> dict:
    """Put a one-item story, an empty sentence and a 10,000-word sentence into the train split (all accepted)."""
    p = data / "train.story-in-sequence.json"
    doc = json.loads(p.read_text())
    sids = list(dict.fromkeys(a[0]["story_id"] for a in doc["annotations"]))
    one, empty, long_ = sids[:3]
    anns = [a for a in doc["annotations"] if a[0]["story_id"] != one or a[0]["worker_arranged_photo_order"] == 0]
    for (r,) in anns:
        if r["story_id"] == empty and r["worker_arranged_photo_order"] == 1:
            r["text"] = ""
        if r["story_id"] == long_ and r["worker_arranged_photo_order"] == 0:
            r["text"] = LONG_SENTENCE
    doc["annotations"] = anns
    p.write_text(json.dumps(doc))
    return {"one_item_story": one, "empty_story": empty, "long_story": long_}


def evaluate_json(run: Path, data: Path, out: Path) -> dict:
    """`iterwego evaluate --json` on the test split, in this process."""
    from iterwego.apps.cli import main

    assert main(["evaluate", "--data", str(data), "--run", str(run), "--quiet", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold bit-identical weights, the same training log and the same chosen rounds."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()  # every loss and validation metric
    ma, mb = (json.loads((r / "meta.json").read_text()) for r in (a, b))
    assert ma["chosen_rounds"] == mb["chosen_rounds"]


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> SimpleNamespace:
    """The shared run's data: 20 synthetic stories (14 train, 3 val, 3 test) with the training edge cases."""
    from iterwego.data.synth import SynthConfig, synthesize

    data = tmp_path_factory.mktemp("shared") / "data"
    synthesize(data, SynthConfig(stories=20, seed=11, image_size=32), progress=False)
    return SimpleNamespace(path=data, **add_training_edge_cases(data))


@pytest.fixture(scope="session")
def trained_run(shared_data, tmp_path_factory) -> SimpleNamespace:
    """One small run trained once per session with ``iterwego train TRAIN_ARGS`` on :func:`shared_data`.

    Attributes: ``data``, ``run``, ``args`` (the train arguments), ``stdout`` (what training printed),
    ``metrics`` (``evaluate --json`` on the test split) and the ids of the edge-case stories.
    Tests must not write into ``run`` or ``data``: copy them.
    """
    import torch

    from iterwego.apps.cli import main

    root = tmp_path_factory.mktemp("trained-run")
    data, run = shared_data.path, root / "run"
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS])
        assert rc == 0, out.getvalue()
        metrics = evaluate_json(run, data, root / "metrics.json")
    finally:
        torch.set_num_threads(threads)
    edits = {k: v for k, v in vars(shared_data).items() if k != "path"}
    return SimpleNamespace(data=data, run=run, args=list(TRAIN_ARGS), stdout=out.getvalue(), metrics=metrics, **edits)


# --------------------------------------------------------------------------- CLI processes started early
# A test that needs a fresh `iterwego` process (another interpreter, torchrun) marks itself with
# ``@pytest.mark.early_start(name, command)``; ``command(data, out)`` returns ``(argv, env)`` for the shared data
# and an empty output directory. Every such process is started when the session's first test starts, so it runs
# on the second core while this process goes on with other tests; the test collects it with
# ``early_runs[name].wait()`` (and finds its files in ``early_runs[name].out``). Nothing starts for tests that were
# not selected.
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "early_start(name, command): start `command(data, out) -> (argv, env)` when the session starts"
    )


class EarlyRun:
    def __init__(self, argv: list[str], env: dict, out: Path):
        import subprocess

        self.argv, self.out = argv, out
        self.logs = out.with_name(out.name + ".stdout"), out.with_name(out.name + ".stderr")
        with open(self.logs[0], "w") as o, open(self.logs[1], "w") as e:
            self.proc = subprocess.Popen(argv, env=env, stdout=o, stderr=e, start_new_session=True)

    def wait(self, timeout: float = 600):
        """The finished process as a ``subprocess.CompletedProcess`` (``stdout`` and ``stderr`` as text)."""
        import subprocess

        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.argv, rc, self.logs[0].read_text(), self.logs[1].read_text())

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
            self.proc.wait()


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory):
    """name -> :class:`EarlyRun` for every ``early_start`` mark on the selected tests."""
    runs: dict[str, EarlyRun] = {}
    for item in request.session.items:
        for mark in item.iter_markers("early_start"):
            name, command = mark.args
            if name not in runs:
                out = tmp_path_factory.mktemp("early") / name
                argv, env = command(request.getfixturevalue("shared_data").path, out)
                runs[name] = EarlyRun(argv, env, out)
    yield runs
    for r in runs.values():
        r.stop()


def fork_cli(argv: list[str], before=None) -> int:
    """Run ``iterwego ARGV`` in a forked child (no interpreter start-up; output discarded); returns its pid.

    ``before()`` runs in the child first (patches that must not touch the test process). The child never returns.
    """
    import os
    import sys

    from iterwego.apps.cli import main

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit, past pytest and atexit handlers
        rc = 70
        try:
            sink = os.open(os.devnull, os.O_WRONLY)
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            sys.stdout = sys.stderr = open(os.devnull, "w")
            if before is not None:
                before()
            rc = main(argv)
        finally:
            os._exit(rc)
    return pid
