"""Write this directory: a tiny run saved by iterwego 0.1.0 and what 0.1.0 computes with it.

It must run with the 0.1.0 code (git commit 470dfd6, the last one before the package layout changed), never
with today's: tests/test_forward.py checks that today's code loads what 0.1.0 wrote and computes the same::

    mkdir -p /tmp/iterwego-0.1 && git archive 470dfd6 src | tar -x -C /tmp/iterwego-0.1
    PYTHONPATH=/tmp/iterwego-0.1/src python tests/data/run_v0_1/make_fixture.py tests/data/run_v0_1

Written: ``config.json``, ``model.safetensors``, ``meta.json`` (by ``IterWeGO.save_pretrained``), ``bert/`` (a
BERT of width 8 with a 22-word vocabulary, named by the config as ``bert:bert``, relative to the run),
``album/`` (three 16-pixel PNGs) and ``expected.json``: 0.1.0's orderer logits for rounds 0..2, aligner
scores, item mappings, fused logits and ``order_stories`` result for the album with ``SENTENCES``. The weights
are the first seeded draw (seed 1860, a few CPU minutes of search) whose mappings are one-to-one, whose guidance
rounds change the logits and whose pair decisions are clear (decoded orders do not hang on float rounding).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import iterwego

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
] + "the a cat dog sat on mat ran went home park we they saw big red old".split()
SENTENCES = ["the cat sat on the mat", "we went home", "they saw a big red dog"]
CHOSEN = {"image": 1, "text": 2}


def album(d: Path) -> list[str]:
    """Three 16x16 pictures told apart by colour and by where a bright bar sits (no random numbers)."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for k, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 220)]):
        px = np.zeros((16, 16, 3), np.uint8)
        px[:] = colour
        px[:, 4 * k : 4 * k + 4] = 255
        p = d / f"photo{k}.png"
        Image.fromarray(px).save(p)
        out.append(str(p))
    return out


def main(out: Path) -> None:
    assert iterwego.__version__ == "0.1.0", f"run this with iterwego 0.1.0, not {iterwego.__version__}"
    from transformers import BertConfig, BertModel, BertTokenizer

    from iterwego.config import AlignerConfig, Config, EncoderConfig, GuidanceConfig, OrdererConfig, TrainConfig
    from iterwego.data import Item, Story
    from iterwego.decode import combine, pair_logprobs
    from iterwego.evaluate import alignment_scores, fuse_logits
    from iterwego.features import build_features, make_batch
    from iterwego.guidance import align, iterate
    from iterwego.inference import order_stories
    from iterwego.model import create_model

    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    assert tok.unk_token_id not in tok("the cat sat on the mat")["input_ids"]
    tok.save_pretrained(out / "bert")
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        initializer_range=0.5,
    )
    BertModel(bert).save_pretrained(out / "bert")

    cfg = Config(
        preset="tiny",
        encoder=EncoderConfig(image="cnn", text="bert:bert", image_size=16, cnn_width=2, text_max_length=12),
        orderer=OrdererConfig(d_model=8, layers=1, heads=2, ffn=8, dropout=0.1),
        aligner=AlignerConfig(kind="learned", dim=4, mapping="argmax", epochs=1),
        guidance=GuidanceConfig(threshold_t2i=0.6, threshold_i2t=0.6, weight_t2i=1.0, weight_i2t=0.5),
        train=TrainConfig(unimodal_epochs=1, iterative_epochs=1),
    )
    images = album(out / "album")
    story = Story("album", [Item(image=i, sentence=t) for i, t in zip(images, SENTENCES)])
    model = create_model(cfg, base_dir=out).eval()
    sets, feats = build_features(model.encoders(), {"x": [story]})
    b = make_batch(sets["x"], [0], np.random.default_rng(0), feats, shuffle=False)
    iv, tv = b.valid("image"), b.valid("text")
    off = ~torch.eye(3, dtype=torch.bool)

    def decisive(logits) -> bool:  # every pair clearly one way: decoded orders do not hang on float rounding
        p = np.exp(combine(pair_logprobs(logits)[0].numpy()))
        return bool(np.abs(p - 0.5)[off.numpy()].min() > 0.05)

    # the first weights whose mappings are one-to-one, whose rounds change the logits and whose orders are clear
    for seed in range(1, 5000):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                scale = 3.0 if name.endswith("classifier.classifier.weight") else 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
            img, txt = (model.orderer(m)(b.feats[m], b.index[m]) for m in ("image", "text"))
            scores = alignment_scores(model, b)
            i2t, t2i = align(scores, "argmax", iv, tv), align(scores.transpose(1, 2), "argmax", tv, iv)
            steps = iterate(
                img,
                txt,
                t2i,
                i2t,
                2,
                threshold_t2i=cfg.guidance.threshold_t2i,
                threshold_i2t=cfg.guidance.threshold_i2t,
                weight_t2i=cfg.guidance.weight_t2i,
                weight_i2t=cfg.guidance.weight_i2t,
                rule=cfg.guidance.eval_rule,
                image_valid=iv,
                text_valid=tv,
            )
            pairing = align(scores, "hungarian", iv, tv)
            fused = fuse_logits(img, txt, pairing)
        changed = all(not torch.equal(steps[r][m][0][off], steps[r - 1][m][0][off]) for r in (1, 2) for m in (0, 1))
        one_to_one = len(set(i2t[0].tolist())) == 3 and len(set(t2i[0].tolist())) == 3
        clear = all(decisive(x) for x in (img, txt, steps[1][0], steps[2][1], fused))
        if one_to_one and changed and clear:
            break
    else:
        raise SystemExit("no seed gave a usable fixture")
    model.save_pretrained(out, meta={"chosen_rounds": CHOSEN})
    result = order_stories(model, [story], chosen_rounds=CHOSEN)[0]
    result["images"] = [Path(p).name for p in result["images"]]
    expected = {
        "iterwego": iterwego.__version__,
        "seed": seed,
        "sentences": SENTENCES,
        "images": [Path(p).name for p in images],
        "image": [s[0][0].tolist() for s in steps],
        "text": [s[1][0].tolist() for s in steps],
        "scores": scores[0].tolist(),
        "i2t": i2t[0].tolist(),
        "t2i": t2i[0].tolist(),
        "pairing": pairing[0].tolist(),
        "fused": fused[0].tolist(),
        "order": result,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
