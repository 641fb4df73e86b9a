"""Settings are checked where they are declared, before any work: one line naming the key, the value and what is
allowed, exit code 2, no data read and no run directory created; the config reference is generated from the same
declarations; the version lives in one place."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import iterwego
from iterwego.apps.cli import main
from iterwego.config import (
    _SECTIONS,
    DECODERS,
    FEATURE_DTYPES,
    PRESETS,
    Config,
    FusionConfig,
    OrdererConfig,
    TrainConfig,
    preset,
    reference_markdown,
)
from iterwego.errors import ConfigError, ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "run_v0_1"  # a run saved by iterwego 0.1.0

# (assignment, what the one line must name besides the key: the value as typed, and what is allowed)
BAD = [
    ("fusion.method=orderr", "'orderr'", "('sum', 'orderer')"),
    ("fusion.epochs=-2", "-2", ">= 0"),
    ("fusion.lr=0", "0", "> 0"),
    ("guidance.threshold_t2i=7", "7", "[0, 1]"),
    ("guidance.threshold_i2t=-0.1", "-0.1", "[0, 1]"),
    ("guidance.eval_threshold_i2t=1.5", "1.5", "[0, 1]"),
    ("guidance.weight_i2t=-1", "-1", ">= 0"),
    ("guidance.train_rule=class2", "'class2'", "'class0'"),
    ("guidance.max_rounds=0", "0", ">= 1"),
    ("orderer.rank_weight=-3", "-3", ">= 0"),
    ("orderer.dropout=1", "1", "[0, 1)"),
    ("orderer.pair_dropout=-0.5", "-0.5", "[0, 1)"),
    ("orderer.heads=0", "0", ">= 1"),
    ("orderer.heads=5", "5", "d_model=96"),
    ("orderer.d_model=0", "0", ">= 1"),
    ("orderer.rank_positions=0", "0", ">= 1"),
    ("train.unimodal_epochs=-1", "-1", ">= 0"),
    ("train.iterative_epochs=-4", "-4", ">= 0"),
    ("train.decoder=exactt", "'exactt'", "'tsort'"),
    ("train.batch_size=0", "0", ">= 1"),
    ("train.eval_batch_size=0", "0", ">= 1"),
    ("train.lr=-0.001", "-0.001", "> 0"),
    ("train.select=pmrr", "'pmrr'", "'pairwise'"),
    ("train.loss_average=sum", "'sum'", "'story'"),
    ("train.amp=fp16", "'fp16'", "'bf16'"),
    ("train.device=gpu", "'gpu'", "'cuda:<N>'"),
    ("train.grad_clip=-1", "-1", ">= 0"),
    ("train.seed=-1", "-1", ">= 0"),
    ("train.early_stop=-5", "-5", ">= 0"),
    ("aligner.mapping=hungarain", "'hungarain'", "('argmax', 'hungarian')"),
    ("aligner.kind=clipp", "'clipp'", "('learned', 'clip')"),
    ("aligner.temperature=0", "0", "> 0"),
    ("aligner.epochs=-1", "-1", ">= 0"),
    ("aligner.clip_model=openai/clip-vit-base-patch32", "'openai/clip-vit-base-patch32'", "'clip:<hf-name-or-dir>'"),
    ("encoder.image=resnet", "'resnet'", "'cnn'"),
    ("encoder.text=tokens", "'tokens'", "'minilm'"),
    ("encoder.feature_dtype=float8", "'float8'", "'bfloat16'"),
    ("encoder.image_size=0", "0", ">= 1"),
    ("encoder.text_max_length=0", "0", ">= 1"),
    ("encoder.text_train_layers=-2", "-2", ">= 0"),
    ("inference.image_rounds=-1", "-1", ">= 0"),
    ("inference.capture_image_rounds=-2", "-2", ">= 0"),
]


def _one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not out
    return lines[0]


def test_the_table_covers_every_section():
    assert len(BAD) >= 20
    assert {a.split(".")[0] for a, _, _ in BAD} == set(_SECTIONS)


@pytest.mark.parametrize("assignment,value,allowed", BAD, ids=[a for a, _, _ in BAD])
def test_bad_setting_is_refused_up_front_through_the_cli(assignment, value, allowed, tmp_path, capsys):
    data, out = tmp_path / "data-never-read", tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--quiet", "--set", assignment])
    line = _one_line(capsys)
    assert rc == 2
    key = assignment.split("=")[0]
    assert line.startswith("iterwego train: error: ") and f"{key}=" in line
    assert value in line.split(f"{key}=", 1)[1] and allowed in line, line
    assert not out.exists()  # no run directory
    assert "data directory" not in line  # refused before the data was looked at
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # the Python API says the same
        preset("tiny").override([assignment])


@pytest.mark.parametrize("assignment,value,allowed", BAD[:6], ids=[a for a, _, _ in BAD[:6]])
def test_print_config_checks_too(assignment, value, allowed, capsys):
    assert main(["train", "--print-config", "--set", assignment]) == 2
    assert allowed in _one_line(capsys)


def test_bad_setting_through_the_installed_entry_point(tmp_path):
    """The real process: exit code 2 and exactly the one line, no traceback."""
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--set", "fusion.method=orderr"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "iterwego", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr == "iterwego train: error: fusion.method='orderr' is not one of ('sum', 'orderer')\n"
    assert not (tmp_path / "run").exists()


def test_a_valid_override_still_works(capsys):
    sets = ["fusion.method=sum", "guidance.threshold_t2i=0.5", "train.decoder=tsort", "train.device=cuda:1"]
    sets += ["orderer.pair_dropout=null", "orderer.rank_weight=0", "train.unimodal_epochs=0", "aligner.lr=1e-4"]
    assert main(["train", "--print-config", *(x for s in sets for x in ("--set", s))]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["fusion"]["method"] == "sum" and cfg["guidance"]["threshold_t2i"] == 0.5
    assert cfg["train"]["decoder"] == "tsort" and cfg["train"]["device"] == "cuda:1"
    assert cfg["orderer"]["pair_dropout"] is None and cfg["orderer"]["rank_weight"] == 0.0
    assert cfg["train"]["unimodal_epochs"] == 0 and cfg["aligner"]["lr"] == 1e-4


@pytest.mark.parametrize(
    "assignment,named",
    [
        ("train.epochz=3", "train has no field 'epochz'"),
        ("trainer.lr=0.1", "'trainer.lr' must be one of"),
        ("lr=0.1", "'lr' must be one of"),
        ("train.lr", "not of the form section.key=value"),
        ("train.lr=fast", "train.lr expects a number"),
        ("train.batch_size=1.5", "train.batch_size expects an integer"),
        ("train.cosine=maybe", "train.cosine expects true/false"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused(assignment, named, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", assignment]) == 2
    assert named in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_bad_setting_before_synthesising(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet", "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size=0 is not >= 1" in _one_line(capsys)
    assert not (tmp_path / "demo").exists()


def test_resume_refuses_set(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--set", "train.lr=0.1"]) == 2
    assert "--resume continues with the run's own config" in _one_line(capsys)


@pytest.mark.parametrize("command", ["evaluate", "order", "serve"])
def test_load_time_set_is_checked_before_anything_runs(command, tmp_path, capsys):
    extra = {
        "evaluate": ["--data", str(tmp_path / "no-data"), "--quiet"],
        "order": ["--sentences", "one", "two"],
        "serve": ["--port", "0", "--quiet"],
    }[command]
    rc = main([command, "--run", str(FIXTURE), "--set", "guidance.eval_threshold_t2i=2", *extra])
    assert rc == 2
    line = _one_line(capsys)
    assert line == f"iterwego {command}: error: guidance.eval_threshold_t2i=2.0 is not in [0, 1]"


def test_python_api_raises_a_value_error_with_the_same_line():
    from iterwego.model import IterWeGO

    with pytest.raises(ConfigError) as err:
        IterWeGO.from_pretrained(FIXTURE, overrides=["fusion.method=orderr"])
    assert isinstance(err.value, ValueError)
    assert str(err.value) == "fusion.method='orderr' is not one of ('sum', 'orderer')"
    with pytest.raises(ConfigError, match=r"orderer\.dropout=1\.5 is not in \[0, 1\)"):
        OrdererConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"train\.lr=inf is not a finite number"):
        preset("tiny").override(["train.lr=Infinity"])
    with pytest.raises(ConfigError, match=r"train\.batch_size='16' is not an integer"):
        TrainConfig(batch_size="16")
    with pytest.raises(ConfigError, match=r"preset='huge' is not one of"):
        Config(preset="huge")
    cfg = preset("tiny")
    cfg.fusion.method = "orderr"  # a config changed in place is checked when asked to, or when copied
    with pytest.raises(ConfigError, match="fusion.method"):
        cfg.validate()


def test_a_saved_run_with_a_bad_value_names_its_file(tmp_path):
    from iterwego.pretrained import read_config

    run = tmp_path / "run"
    run.mkdir()
    for name in ("meta.json", "model.safetensors"):
        (run / name).write_bytes((FIXTURE / name).read_bytes())
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg["train"]["batch_size"] = 0
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: train\.batch_size=0 is not >= 1"):
        read_config(run)


def test_runs_saved_by_earlier_versions_and_every_preset_pass_the_checks():
    from iterwego.pretrained import read_config

    cfg, _ = read_config(FIXTURE)  # 0.1: written before many fields existed
    assert cfg.validate() is cfg and cfg.fusion == FusionConfig()
    for name in PRESETS:
        assert preset(name).validate().preset == name


def test_every_field_declares_what_it_allows_and_what_it_does():
    for cls in (Config, *_SECTIONS.values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if f.name in _SECTIONS or str(f.type) == "bool":
                continue
            m = f.metadata
            declared = [k for k in ("choices", "forms", "within") if m.get(k) is not None]
            assert declared, f"{cls.__name__}.{f.name} declares no allowed values"


def test_allowed_values_have_one_home():
    from iterwego import aligner, decode, guidance
    from iterwego.data.store import STORAGE

    assert decode.DECODERS is DECODERS
    assert aligner.MAPPINGS == ("argmax", "hungarian") and guidance.RULES == ("any", "class0", "class1")
    assert set(FEATURE_DTYPES) == set(STORAGE)


def test_config_reference_is_generated_and_current():
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference_markdown(), "docs/config.md is stale: run `python -m iterwego.config > docs/config.md`"
    for name, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{name}.{f.name}` |" in page, f"{name}.{f.name} is missing from docs/config.md"
    assert "| `train.batch_size` | int | `16` | >= 1 | paper: `64`, paper+: `64` |" in page
    assert '| `fusion.method` | str | `"sum"` | `"sum"`, `"orderer"` | tiny: `"orderer"`, paper+: `"orderer"` |' in page


def test_version_is_written_once(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"iterwego {iterwego.__version__}\n"
    assert iterwego.__version__ == "0.4.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "iterwego.__version__" }' in pyproject
    assert importlib.metadata.version("iterwego") == iterwego.__version__  # what pip reports (re-run `make setup`)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {iterwego.__version__}" in changelog and "## 0.2.0" in changelog and "## 0.1.0" in changelog


def test_the_web_page_and_saved_runs_read_the_one_version(tmp_path):
    from iterwego.apps.serve import OrderService
    from iterwego.model import IterWeGO

    assert OrderService.load(FIXTURE, device="cpu").info()["version"] == iterwego.__version__
    app_js = (Path(iterwego.__file__).parent / "apps" / "web" / "app.js").read_text()
    assert "(iterwego ${info.version})" in app_js  # the page prints what /api/info says, nothing hard-coded
    IterWeGO.from_pretrained(FIXTURE).save_pretrained(tmp_path / "resaved")
    meta = json.loads((tmp_path / "resaved" / "meta.json").read_text())
    assert meta["versions"]["iterwego"] == iterwego.__version__  # what the model card's "trained with" line reads
