"""An imported authors' checkpoint is a run like any other: `iterwego order` and `iterwego evaluate` work on it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

import test_official as T
from floats import assert_float32_close
from iterwego.apps.cli import main
from iterwego.compat.official import load_official, save_as_run


@pytest.fixture(scope="module")
def official_and_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("imp")
    clip_cfg = copy.deepcopy(T.CLIP_CFG)
    # the CLIP aligner reads sentences with the same tiny vocabulary; its text embedding sits at [SEP]
    clip_cfg["text_config"].update(vocab_size=len(T.WORDS), bos_token_id=2, eos_token_id=3, pad_token_id=0)
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
    return model, tok, save_as_run(model, d / "run", bert_tokenizer=tok, clip_tokenizer=tok)


@pytest.fixture(scope="module")
def imported(official_and_run):
    return official_and_run[2]


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
    assert set(rep) == {
        "image",
        "text",
        "fused",
        "fused_text",
        "fusion",
        "alignment_accuracy",
    }  # real data: no ceilings
    assert rep["fusion"] == "sum" and len(rep["image"]["rounds"]) == 4  # the authors' model: no iterwego heads


# words per sentence, story by story: BERT sees words + 2 tokens, so 3 to 40 tokens, and one sentence cut at 40
STORY_WORDS = [[1, 1, 1], [1, 5, 12, 20], [38, 2, 7], [45, 3, 10, 4, 6], [8, 8, 30], [2, 15, 3, 25], [5, 33, 1]]
SHARED = (1, 1)  # story 6's first sentence is story 1's second: the same text, padded to another length


def _padded_stories(data, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = T.WORDS[5:]
    stories = []
    for k, lengths in enumerate(STORY_WORDS):
        sents = [" ".join(rng.choice(words, n)) for n in lengths]
        stories.append({"id": f"s{k}", "images": _images(data, len(lengths), 100 + k), "sentences": sents})
    stories[6]["sentences"][0] = stories[SHARED[0]]["sentences"][SHARED[1]]
    return stories


def _write_split(data, split: str, stories: list[dict]) -> None:
    with open(data / f"{split}.jsonl", "w") as f:
        for st in stories:
            f.write(json.dumps(st) + "\n")


def test_evaluate_on_imported_run_equals_official_logits_story_by_story(official_and_run, tmp_path):
    """Per-round logits and metrics of `iterwego evaluate` equal the authors' computation, one story at a time.

    Sentences of 3 to 40 tokens (one cut at 40) make the authors' all-position mean depend on each story's
    padding; one sentence appears in two stories padded to different lengths, and the second evaluation
    reads every feature back from the cache.
    """
    import torch

    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import build_features
    from iterwego.data.readers import load_split
    from iterwego.decode import decode_stories, pair_logprobs
    from iterwego.encoders import clip_pixel_values
    from iterwego.metrics import order_metrics
    from iterwego.model import load_run
    from iterwego.training.evaluator import Evaluator

    official, tok, run = official_and_run
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    _write_split(data, "test", _padded_stories(data))
    _write_split(data, "val", _padded_stories(data, seed=8)[:2])
    lengths = [len(ids) for st in _padded_stories(data) for ids in tok(st["sentences"])["input_ids"]]
    assert min(lengths) == 3 and max(lengths) > 40  # 3 tokens up to one sentence cut at 40

    reports = []
    for _ in range(2):  # the second run reads every feature from the cache
        js = tmp_path / f"m{len(reports)}.json"
        argv = ["evaluate", "--data", str(data), "--format", "jsonl", "--run", str(run), "--split", "test"]
        assert main([*argv, "--quiet", "--json", str(js), "--cache-dir", str(cache_dir)]) == 0
        reports.append(json.loads(js.read_text()))
    assert reports[0] == reports[1]

    # the presentation `evaluate` uses (same seed), featurized through the same cache
    model, _ = load_run(run)
    stories = load_split(data, "test", fmt="jsonl")
    sets, feats = build_features(model.encoders(), {"test": stories}, cache=FeatureCache(cache_dir))
    ev = Evaluator(sets["test"], feats, seed=model.cfg.train.seed + 2)
    got_orders, ref_orders, gold, n_checked = [[] for _ in range(4)], [[] for _ in range(4)], [], 0
    for batch in ev.batches:
        with torch.no_grad():
            fw = model(batch, 3, fuse=False)
        for b, sid in enumerate(batch.ids):
            st, n = stories[sid], int(batch.valid("image")[b].sum())
            pos_i, pos_t = batch.pos["image"][b, :n].tolist(), batch.pos["text"][b, :n].tolist()
            pv = clip_pixel_values([st.items[p].image for p in pos_i], 30)
            sents = [st.items[p].sentence for p in pos_t]
            bert_in = dict(tok(sents, padding="longest", max_length=40, truncation=True, return_tensors="pt"))
            clip_in = dict(tok(sents, padding="longest", max_length=40, truncation=True, return_tensors="pt"))
            gold.append(list(range(n)))
            with torch.no_grad():  # the sentence features themselves: padded as the authors pad, whatever the batch
                ref_feats = official.text_features(bert_in)
            # BERT over one story alone against the cached features of the story in a batch: one float32 computation
            ours = batch.feats["text"][batch.index["text"][b, :n]]
            assert_float32_close(ours, ref_feats, ulps=T.BACKBONE_ULPS)
            pairs = ~torch.eye(n, dtype=torch.bool)  # (i, i) is no pair: nothing reads it
            for r in range(4):
                # float32 through a padded batch of stories vs one story through the authors' module: the same
                # chain as test_official's OFFICIAL_ULPS (whose companion shows a skipped round misses by far),
                # at the logits' scale (up to ~80)
                ref_img, ref_txt = official.official_logits(pv, bert_in, clip_in, r)
                assert_float32_close(fw.image[r][b, :n, :n][pairs], ref_img[pairs], ulps=T.OFFICIAL_ULPS)
                assert_float32_close(fw.text[r][b, :n, :n][pairs], ref_txt[pairs], ulps=T.OFFICIAL_ULPS)
                for logits, pos, out in ((ref_img, pos_i, ref_orders), (ref_txt, pos_t, got_orders)):
                    slots, _ = decode_stories(pair_logprobs(logits[None]).numpy(), [n], "tsort")
                    out[r].append(("image" if out is ref_orders else "text", [pos[s] for s in slots[0]]))
            n_checked += 1
    assert n_checked == len(STORY_WORDS)
    for r in range(4):  # metrics from the authors' logits, decoded as `evaluate` decodes (tsort for this run)
        for mod, orders in (("image", ref_orders), ("text", got_orders)):
            m = order_metrics([o for _, o in orders[r]], gold)
            # metrics are ratios of small counts computed in float64 from the same discrete orders: exact up to
            # a few float64 ulps of O(1) values on any CPU
            assert reports[0][mod]["rounds"][r] == pytest.approx({k: m[k] for k in ("acc", "pmr", "tau")}, abs=1e-12)
    assert reports[0]["text"]["rounds"][0] != reports[0]["text"]["rounds"][3]  # guidance changed something
