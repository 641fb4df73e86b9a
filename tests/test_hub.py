"""Runs shared the Hugging Face way: Hub ids through the local cache, push_to_hub, model cards, portable backbones.

No test touches the network: the "Hub" is a local cache in the standard layout
(``models--ORG--NAME/{blobs,refs,snapshots}``) read with HF_HUB_OFFLINE=1, and uploads go to a stand-in of
``HfApi`` that keeps what it receives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from iterwego.apps.cli import main
from iterwego.config import Config, EncoderConfig, OrdererConfig
from iterwego.errors import ModelLoadError
from iterwego.model import IterWeGO, create_model

SENTENCES = ["they reach the lake at noon.", "the family packs the car.", "at night they light a fire."]


# --------------------------------------------------------------------------- a local Hub
def publish(src: Path, cache: Path, repo_id: str, ref: str = "main") -> Path:
    """Put the files of ``src`` into the Hugging Face cache ``cache`` as revision ``ref`` of ``repo_id``."""
    commit = hashlib.sha1(f"{repo_id}@{ref}@{src}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = snap / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub and transformers read (HF_HUB_OFFLINE=1 from conftest)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.is_offline_mode()
    return cache


class CommitInfo(str):
    """Like huggingface_hub's CommitInfo: the commit URL as a string, and as ``.commit_url``."""

    @property
    def commit_url(self) -> str:
        return str(self)


class FakeHub:
    """Stands in for ``HfApi``: records create_repo calls and keeps uploaded files as the Hub would."""

    def __init__(self, root: Path, fail: Exception | None = None):
        self.root, self.fail, self.repos, self.commits = root, fail, {}, []

    def __call__(self, token=None, **kw):
        return self

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        if self.fail is not None:
            raise self.fail
        self.repos[repo_id] = {"private": private, "exist_ok": exist_ok}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        kept = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in kept:
            (self.root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, self.root / repo_id / name)
        self.commits.append({"repo_id": repo_id, "files": sorted(kept), **kw})
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{len(self.commits)}")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub
    from huggingface_hub import hub_mixin

    hub = FakeHub(tmp_path / "uploaded")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    monkeypatch.setattr(hub_mixin, "HfApi", hub)
    return hub


# --------------------------------------------------------------------------- a small run
def tiny_config(bert_dir) -> Config:
    return Config(
        encoder=EncoderConfig(image="cnn", image_size=32, cnn_width=4, text=f"bert:{bert_dir}", text_max_length=16),
        orderer=OrdererConfig(d_model=16, layers=1, heads=2, ffn=16),
    )


def save_tiny_run(run: Path, bert_dir, chosen=None) -> IterWeGO:
    torch.manual_seed(0)
    model = create_model(tiny_config(bert_dir)).eval()
    model.save_pretrained(run, meta={"chosen_rounds": chosen or {"image": 1, "text": 1}})
    return model


@pytest.fixture(scope="module")
def album(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("album")
    paths = []
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        px = np.zeros((32, 32, 3), np.uint8)
        px[:, :] = colour
        px[4 * k : 4 * k + 8, 4:12] = 255
        Image.fromarray(px).save(d / f"photo{k}.png")
        paths.append(str(d / f"photo{k}.png"))
    return paths


def _same_weights(a: IterWeGO, b: IterWeGO) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _order_json(run: str, album: list[str], out: Path, *extra: str) -> dict:
    assert main(["order", "--run", run, "--images", *album, "--sentences", *SENTENCES, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- loading by Hub id
def test_run_loads_by_hub_id_from_the_cache_and_orders_an_album(
    tmp_path, hub_cache, tiny_bert_dir, album, no_network, capsys
):
    run = tmp_path / "run"
    model = save_tiny_run(run, tiny_bert_dir)
    snap = publish(run, hub_cache, "org/iterwego-tiny")
    save_tiny_run(tmp_path / "run-v2", tiny_bert_dir, chosen={"image": 0, "text": 3})
    publish(tmp_path / "run-v2", hub_cache, "org/iterwego-tiny", ref="v2")

    loaded = IterWeGO.from_pretrained("org/iterwego-tiny")
    assert loaded.run_dir == snap and _same_weights(model, loaded)
    assert loaded.meta["chosen_rounds"] == {"image": 1, "text": 1}
    assert IterWeGO.from_pretrained("org/iterwego-tiny", revision="v2").meta["chosen_rounds"]["text"] == 3

    by_id = _order_json("org/iterwego-tiny", album, tmp_path / "hub.json")
    by_dir = _order_json(str(run), album, tmp_path / "dir.json")
    assert by_id == by_dir and by_id["mode"] == "fused"
    assert sorted(by_id["image_order"]) == [0, 1, 2] and sorted(by_id["sentence_order"]) == [0, 1, 2]
    assert no_network == []


@pytest.mark.parametrize("command", ["order", "evaluate", "serve"])
def test_unknown_hub_id_is_one_line(tmp_path, hub_cache, command, capsys, no_network):
    argv = {
        "order": ["order", "--run", "org/no-such-run", "--sentences", "a", "b"],
        "evaluate": ["evaluate", "--run", "org/no-such-run", "--data", str(tmp_path)],
        "serve": ["serve", "--run", "org/no-such-run", "--port", "0"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "org/no-such-run: no such run directory, and not in the local Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err and no_network == []


def test_hub_repo_that_is_not_an_iterwego_run_is_refused(tmp_path, hub_cache, tiny_bert_dir, capsys):
    publish(Path(tiny_bert_dir), hub_cache, "org/plain-bert")
    with pytest.raises(ModelLoadError, match="org/plain-bert: this Hub repository is not an iterwego run"):
        IterWeGO.from_pretrained("org/plain-bert")
    assert main(["order", "--run", "org/plain-bert", "--revision", "nope", "--sentences", "a", "b"]) == 2
    assert "revision 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- pushing
def test_push_to_hub_uploads_a_run_that_loads_back(tmp_path, hub_cache, fake_hub, tiny_bert_dir):
    run = tmp_path / "run"
    model = save_tiny_run(run, tiny_bert_dir)
    model.card_text = "---\nlibrary_name: iterwego\n---\n# my card\n"
    url = model.push_to_hub("org/pushed", private=True)
    assert url.startswith("https://huggingface.co/org/pushed/commit/")
    assert fake_hub.repos["org/pushed"] == {"private": True, "exist_ok": True}
    assert fake_hub.commits[0]["files"] == ["README.md", "config.json", "meta.json", "model.safetensors"]
    assert (fake_hub.root / "org/pushed/README.md").read_text() == model.card_text

    publish(fake_hub.root / "org/pushed", hub_cache, "org/pushed")
    back = IterWeGO.from_pretrained("org/pushed")
    assert _same_weights(model, back) and back.card_text == model.card_text

    model.card_text = None  # a model built in Python without a card gets the mixin's, tagged for iterwego
    model.push_to_hub("org/bare")
    assert "library_name: iterwego" in (fake_hub.root / "org/bare/README.md").read_text()


def test_cli_push_uploads_the_run_directory_with_a_fresh_card(tmp_path, fake_hub, tiny_bert_dir, capsys):
    run = tmp_path / "run"
    save_tiny_run(run, tiny_bert_dir)
    (run / "train_state.pt").write_bytes(b"resume state stays local")
    (run / "tb").mkdir()
    (run / "tb" / "events.out").write_bytes(b"x")
    (run / "log.jsonl").write_text("{}\n")
    assert main(["push", str(run), "org/shared", "--private"]) == 0
    assert "org/shared" in capsys.readouterr().out
    assert fake_hub.repos["org/shared"]["private"] is True
    files = fake_hub.commits[0]["files"]
    assert files == ["README.md", "config.json", "log.jsonl", "meta.json", "model.safetensors"]
    card = (fake_hub.root / "org/shared/README.md").read_text()
    assert 'IterWeGO.from_pretrained("org/shared")' in card and "iterwego order --run org/shared" in card
    assert card == (run / "README.md").read_text()

    (run / "README.md").write_text("my own words\n")
    assert main(["push", str(run), "org/shared", "--keep-card"]) == 0
    assert (fake_hub.root / "org/shared/README.md").read_text() == "my own words\n"


def test_push_refused_by_the_hub_is_one_line(tmp_path, monkeypatch, tiny_bert_dir, capsys):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    response = SimpleNamespace(status_code=401, headers={}, request=None)
    refused = HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub(tmp_path, fail=refused))
    run = tmp_path / "run"
    save_tiny_run(run, tiny_bert_dir)
    assert main(["push", str(run), "org/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/x: cannot push" in err and "hf auth login" in err
    assert main(["push", str(tmp_path / "absent"), "org/x"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["push", str(run), "x"]) == 2
    assert "give the full Hub id ORG/NAME" in capsys.readouterr().err


# --------------------------------------------------------------------------- portable backbones
def test_backbones_load_by_hub_name_elsewhere_unless_a_local_copy_is_given(tmp_path, monkeypatch, tiny_bert_dir):
    from huggingface_hub import constants

    machine_a, machine_b = tmp_path / "cache-a", tmp_path / "cache-b"
    snap = publish(Path(tiny_bert_dir), machine_a, "org/tiny-bert")
    run = tmp_path / "run"
    model = save_tiny_run(run, snap)  # trained from a local directory that a Hugging Face cache holds
    src = json.loads((run / "meta.json").read_text())["backbone_sources"]["text"]
    assert src["hub"] == "org/tiny-bert" and src["revision"] == snap.name and src["local_path"] == str(snap.resolve())
    feats = model.text_encoder.featurize(SENTENCES)
    logits = lambda m: m.text(feats, torch.tensor([[2, 0, 1]]))  # noqa: E731

    shutil.rmtree(machine_a)  # another machine: that path is gone, the Hub name is in its own cache
    publish(Path(tiny_bert_dir), machine_b, "org/tiny-bert")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(machine_b))
    there = IterWeGO.from_pretrained(run)
    assert there.cfg.encoder.text == "bert:org/tiny-bert" and torch.equal(logits(there), logits(model))

    shutil.rmtree(machine_b)  # nothing cached: a local copy given at load time
    copy = shutil.copytree(tiny_bert_dir, tmp_path / "my-bert")
    with pytest.raises(ModelLoadError, match="org/tiny-bert"):
        IterWeGO.from_pretrained(run)
    for kw in ({"overrides": [f"encoder.text=bert:{copy}"]}, {"backbones": {"text": str(copy)}}):
        local = IterWeGO.from_pretrained(run, **kw)
        assert local.cfg.encoder.text == f"bert:{copy}" and torch.equal(logits(local), logits(model))


def test_local_backbone_without_hub_name_asks_for_a_copy_and_old_runs_still_load(tmp_path, tiny_bert_dir, capsys):
    bert = shutil.copytree(tiny_bert_dir, tmp_path / "weights" / "bert")
    run = tmp_path / "run"
    save_tiny_run(run, bert)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["backbone_sources"]["text"]["hub"] is None and "image" not in meta["backbone_sources"]

    old = shutil.copytree(run, tmp_path / "old-run")  # as the previous version wrote it: no sources recorded
    del meta["backbone_sources"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert IterWeGO.from_pretrained(old).cfg.encoder.text == f"bert:{bert}"

    moved = shutil.move(bert, tmp_path / "elsewhere")
    assert main(["order", "--run", str(run), "--sentences", *SENTENCES]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hub name" in err and "--set encoder.text=bert:DIR" in err
    assert main(["order", "--run", str(run), "--sentences", *SENTENCES, "--set", f"encoder.text=bert:{moved}"]) == 0


# --------------------------------------------------------------------------- recording evaluations in the card
def test_evaluate_update_card_records_the_split_in_meta_and_card(tmp_path, hub_cache, tiny_bert_dir, capsys):
    from iterwego.data.synth import SynthConfig, synthesize

    data = tmp_path / "data"
    synthesize(data, SynthConfig(stories=12, seed=5, lengths=(3, 4), image_size=32))
    run = tmp_path / "run"
    save_tiny_run(run, tiny_bert_dir)
    argv = ["evaluate", "--run", str(run), "--data", str(data), "--split", "test", "--quiet", "--no-cache"]
    assert main([*argv, "--json", str(tmp_path / "m.json"), "--update-card"]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    rec = json.loads((run / "meta.json").read_text())["evaluation"]["test"]
    # the JSON file adds the synthetic split's ceilings and the fused rows' shares of them to the recorded report
    shares = report.pop("fused_ceiling_share")
    assert set(shares) == {"image", "text"} and rec["ceilings"] == report.pop("ceilings") is not None
    assert rec["report"] == report and rec["decoder"] == "exact"
    card = (run / "README.md").read_text()
    img = report["image"]["unimodal"]
    row = f"| unimodal (round 0) | {100 * img['acc']:.1f} | {100 * img['pmr']:.1f} | {img['tau']:+.3f} |"
    assert "**test** split" in card and row in card and "Ceilings (Bayes-optimal PMR" in card

    assert main([*argv, "--update-card", "--set", "guidance.threshold_t2i=0.5"]) == 2
    assert "--set guidance.threshold_t2i changes it" in capsys.readouterr().err
    publish(run, hub_cache, "org/evaluated")
    assert main(["evaluate", "--run", "org/evaluated", "--data", str(data), "--update-card", "--quiet"]) == 2
    assert "needs a local run directory" in capsys.readouterr().err
