"""An imported authors' checkpoint is a run like any other: `iterwego order` and `iterwego evaluate` work on it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

import test_official as T
from iterwego.apps.cli import main
from iterwego.compat.official import load_official, save_as_run


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("imp")
    clip_cfg = copy.deepcopy(T.CLIP_CFG)
    clip_cfg["text_config"]["vocab_size"] = len(
        T.WORDS
    )  # the CLIP aligner reads sentences with the same tiny vocabulary
    orig = T.CLIP_CFG
    T.CLIP_CFG = clip_cfg
    try:
        state = T.authors_state(3)
    finally:
        T.CLIP_CFG = orig
    ck = T.write_ckpt(d / "wego.best.pt", state)
    model = load_official(ck, clip_config=clip_cfg, bert_config=T.BERT_CFG)
    tok = T.bert_tokenizer()
    tok.model_max_length = 40
    return save_as_run(model, d / "run", bert_tokenizer=tok, clip_tokenizer=tok)


def _images(d, n, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        p = d / f"img{seed}_{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_order_on_imported_run(imported, tmp_path):
    imgs = _images(tmp_path, 3, 0)
    out = tmp_path / "o.json"
    assert (
        main(["order", "--run", str(imported), "--images", *imgs, "--sentences", *T.SENTENCES, "--json", str(out)]) == 0
    )
    res = json.loads(out.read_text())
    assert (
        res["mode"] == "fused"
        and sorted(res["image_order"]) == [0, 1, 2]
        and sorted(res["sentence_order"]) == [0, 1, 2]
    )


def test_evaluate_on_imported_run(imported, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    words = T.WORDS[5:]
    rng = np.random.default_rng(1)
    for split in ("val", "test"):
        with open(data / f"{split}.jsonl", "w") as f:
            for s in range(4):
                n = 3 + s % 2
                sents = [" ".join(rng.choice(words, 4)) for _ in range(n)]
                imgs = [p for p in _images(data, n, hash((split, s)) % 1000)]
                f.write(json.dumps({"id": f"{split}{s}", "images": imgs, "sentences": sents}) + "\n")
    js = tmp_path / "m.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--format",
                "jsonl",
                "--run",
                str(imported),
                "--split",
                "test",
                "--quiet",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    rep = json.loads(js.read_text())
    assert set(rep) == {"image", "text", "fused", "alignment_accuracy"}
    assert len(rep["image"]["rounds"]) == 4
