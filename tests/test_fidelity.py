"""The `paper` preset is the authors' recipe as docs/fidelity.md tabulates it; `paper+` differs where it says.

The table is read from the document itself, so the documentation and the presets cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from iterwego.apps.cli import main
from iterwego.config import preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
NO_AUTHORS = "—"  # the authors' cell of a row without a counterpart in the released code


def _value(cell: str):
    """The first `literal` of a table cell, parsed as JSON (strings are quoted in the document)."""
    m = re.search(r"`([^`]*)`", cell)
    assert m, f"no `value` in cell {cell!r}"
    return json.loads(m.group(1))


def recipe_rows() -> list[dict]:
    """Rows of the main table that name a config key: key, authors (None for "—"), paper, paper+, why."""
    text = DOC.read_text()
    table = text.split("## The recipe, row by row", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[1].startswith("`"):
            continue
        item, key, authors, paper, plus, why = cells
        rows.append(
            {
                "item": item,
                "key": key.strip("`"),
                "authors": None if authors.startswith(NO_AUTHORS) else _value(authors),
                "paper": _value(paper),
                "paper+": _value(plus),
                "why": why,
            }
        )
    return rows


def get(cfg: dict, key: str):
    section, name = key.split(".")
    return cfg[section][name]


def _holds(cfg: dict, rows: list[dict], skip: set[str] = frozenset()) -> list[str]:
    """Rows whose authors' value the config does not hold, as readable lines."""
    return [
        f"{r['key']}: authors {r['authors']!r}, config {get(cfg, r['key'])!r}"
        for r in rows
        if r["authors"] is not None and r["key"] not in skip and get(cfg, r["key"]) != r["authors"]
    ]


def test_table_is_complete_and_presets_match_it():
    rows = recipe_rows()
    assert len(rows) >= 35
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key is listed twice"
    paper, plus = preset("paper").to_dict(), preset("paper+").to_dict()
    for r in rows:
        assert get(paper, r["key"]) == r["paper"], r["key"]
        assert get(plus, r["key"]) == r["paper+"], r["key"]
        if r["authors"] is not None:
            assert r["paper"] == r["authors"], f"{r['key']}: the paper preset must hold the authors' value"
        if r["paper+"] != r["paper"]:
            assert len(r["why"]) > 40, f"{r['key']}: paper+ differs without a reason"
    # every difference between the presets is a row of the table (the learned aligner's own sizes aside)
    learned_only = {"aligner.dim", "aligner.epochs", "aligner.lr", "aligner.temperature"}
    differ = {
        f"{s}.{k}"
        for s, section in paper.items()
        if isinstance(section, dict)
        for k, v in section.items()
        if plus[s][k] != v
    }
    assert differ - learned_only <= set(keys), sorted(differ - learned_only - set(keys))
    assert differ - learned_only == {r["key"] for r in rows if r["paper"] != r["paper+"]}


def test_train_preset_paper_resolves_to_the_authors_recipe(tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "paper", "--print-config"]
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "paper"
    assert _holds(cfg, recipe_rows()) == []


@pytest.fixture
def tiny_clip_with_tokenizer(tiny_clip_dir, tmp_path) -> Path:
    """The tiny CLIP with a (tiny-vocabulary) tokenizer beside it, so it can serve as the zero-shot aligner."""
    import test_official as T

    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    T.bert_tokenizer().save_pretrained(d)
    return d


# the rows this run replaces: the real CLIP / BERT are not here and the tiny CLIP reads 16 tokens; a 768-wide
# orderer would spend the test's time writing its 200 MB training state every epoch (the print-config test
# above checks these rows of the very config that `train` writes)
STAND_IN_ROWS = {"encoder.image", "encoder.text", "aligner.clip_text_max_length", "orderer.d_model", "orderer.ffn"}


@pytest.mark.usefixtures("one_thread")
def test_train_preset_paper_writes_the_recipe_and_selects_as_the_authors(
    tmp_path, tiny_clip_with_tokenizer, tiny_bert_dir
):
    """`iterwego train --preset paper` (tiny stand-ins for CLIP and BERT): config.json holds every row;
    5 guided epochs at a constant rate, no early stop, the best epoch by the authors' pairwise criterion."""
    from iterwego.data.synth import SynthConfig, synthesize

    data, run = tmp_path / "data", tmp_path / "run"
    synthesize(data, SynthConfig(stories=24, seed=3, image_size=32, lengths=(3, 4)))
    overrides = [
        f"encoder.image=clip:{tiny_clip_with_tokenizer}",
        f"encoder.text=bert:{tiny_bert_dir}",
        "aligner.clip_text_max_length=16",
        "orderer.d_model=32",
        "orderer.ffn=32",
    ]
    argv = ["train", "--data", str(data), "--out", str(run), "--preset", "paper", "--quiet", "--no-cache"]
    assert main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert _holds(cfg, recipe_rows(), skip=STAND_IN_ROWS) == []
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    guided = [e for e in log if e["stage"] == "iterative" and e["epoch"] >= 0]
    assert [e["epoch"] for e in guided] == [0, 1, 2, 3, 4]  # no early stop
    assert not any(e["stage"] == "aligner" for e in log)  # the zero-shot aligner does not train
    rates = {e["lr"] for e in log if e["stage"].startswith("unimodal")}
    assert rates == {2e-4 * 0.5}  # constant: the set transformer and classifier at 0.5x
    scores = [e["val"]["selection"] for e in guided]
    assert all(0.0 <= s <= 1.0 for s in scores)  # pairwise accuracies, not PMR of chosen rounds
    meta = json.loads((run / "meta.json").read_text())
    best = max(range(5), key=lambda k: (scores[k], -k))
    assert meta["chosen_rounds"] == guided[best]["val"]["chosen_rounds"]
    assert main(["evaluate", "--data", str(data), "--run", str(run), "--quiet", "--no-cache"]) == 0


@pytest.mark.parametrize("bad", ["train.select=best", "train.loss_average=batch"])
def test_unknown_recipe_value_is_a_one_line_error(tmp_path, capsys, bad):
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "paper", "--set", bad]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and bad.split("=")[0] in err and bad.split("=")[1] in err
