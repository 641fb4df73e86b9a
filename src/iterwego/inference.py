"""Ordering new albums: the job a user comes for.

:func:`order_stories` takes stories whose items are in *arbitrary* order
(no gold), runs both orderers, the aligner and the validation-chosen number
of guidance rounds, and returns per story the recovered orders, the
image-sentence pairing and the confidence of each adjacent step, for every
variant (image only, sentences only, guided, fused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import Item, Story
from .decode import decode, pair_logprobs
from .errors import DataError
from .features import build_features, make_batch
from .guidance import align, iterate

SCHEMA_VERSION = 1


def _decode(lp: np.ndarray, decoder: str) -> list[int]:
    n = lp.shape[0]
    return decode(lp, method="beam" if decoder == "exact" and n > 12 else decoder)


def _adjacent(p: np.ndarray, order: list[int]) -> list[float]:
    """P(order[k] before order[k+1]) under the combined pair probabilities."""
    return [float(p[a, b]) for a, b in zip(order, order[1:])]


def _combined_prob(lp: np.ndarray) -> np.ndarray:
    from .decode import combine

    return np.exp(combine(lp))


def order_stories(model, stories: list[Story], *, chosen_rounds: dict | None = None, decoder: str = "exact", progress: bool = False) -> list[dict]:
    """Order each story's images and sentences as given (the given order is ignored).

    A story may have images only, sentences only, or both; with both in
    equal numbers the guided and fused variants are computed, otherwise
    each modality is ordered alone and ``note`` says so.
    """
    chosen_rounds = chosen_rounds or {}
    for s in stories:
        if len(s.items) < 2:
            raise DataError(f"a story needs at least 2 items to order, got {len(s.items)}", path=s.meta.get("source"), line=s.meta.get("line"), story=s.id)
    device = next(model.parameters()).device
    results = []
    for s in stories:  # one story at a time keeps memory flat for large albums; batching is for evaluation
        imgs = [it.image for it in s.items if it.image is not None]
        sents = [it.sentence for it in s.items if it.sentence is not None]
        res: dict = {"schema": SCHEMA_VERSION, "id": s.id, "images": imgs, "sentences": sents, "variants": {}}
        use = {"image": bool(imgs) and model.image is not None, "text": bool(sents) and model.text is not None}
        cross = use["image"] and use["text"] and len(imgs) == len(sents) and model.aligner is not None
        notes = []
        if imgs and sents and len(imgs) != len(sents):
            notes.append(f"{len(imgs)} images but {len(sents)} sentences: each modality is ordered alone")
        elif imgs and sents and not cross:
            notes.append("this run cannot align images and sentences: each modality is ordered alone")
        if decoder == "exact" and max(len(imgs), len(sents)) > 12:
            notes.append(f"{max(len(imgs), len(sents))} items: more than the exact decoder's 12, so the beam decoder was used")
        model.eval()
        encs = model.encoders()
        # the text backbone counts sentences it cut at its token limit; the user should hear about them
        text_bb = getattr(encs.get("text"), "backbone", None)
        cut_before = getattr(text_bb, "truncated", 0)
        logits = {}
        if cross:
            story = Story(s.id, [Item(image=i, sentence=t) for i, t in zip(imgs, sents)])
            sets, feats = build_features(encs, {"x": [story]})
            b = make_batch(sets["x"], [0], np.random.default_rng(0), feats, shuffle=False).to(device)
            with torch.no_grad():
                logits = {m: model.orderer(m)(b.feats[m], b.index[m]) for m in ("image", "text")}
        else:
            for mod in ("image", "text"):
                if not use[mod]:
                    continue
                its = [Item(image=p) for p in imgs] if mod == "image" else [Item(sentence=t) for t in sents]
                sets, feats = build_features({mod: encs[mod]}, {"x": [Story(s.id, its)]}, cross_modal=False)
                bm = make_batch(sets["x"], [0], np.random.default_rng(0), feats, shuffle=False).to(device)
                with torch.no_grad():
                    logits[mod] = model.orderer(mod)(bm.feats[mod], bm.index[mod])
        cut = getattr(text_bb, "truncated", 0) - cut_before
        if cut:
            notes.append(f"{cut} sentence(s) longer than {getattr(text_bb, 'max_length', '?')} tokens were truncated")
        if notes:
            res["note"] = "; ".join(notes)
        lps = {m: pair_logprobs(lg)[0].float().cpu().numpy() for m, lg in logits.items()}
        for m, lp in lps.items():
            o = _decode(lp, decoder)
            res["variants"][f"{m}_only"] = {"order": o, "confidence": _adjacent(_combined_prob(lp), o)}
        if cross:
            with torch.no_grad():
                from .evaluate import alignment_scores, fuse_logits

                scores = alignment_scores(model, b)
                iv, tv = b.valid("image"), b.valid("text")
                i2t_h = align(scores, "hungarian", iv, tv)
                mapping = model.cfg.aligner.mapping
                i2t, t2i = align(scores, mapping, iv, tv), align(scores.transpose(1, 2), mapping, tv, iv)
                g = model.cfg.guidance
                R = max(chosen_rounds.get("image", 0), chosen_rounds.get("text", 0))
                steps = iterate(logits["image"], logits["text"], t2i, i2t, R, threshold_t2i=g.threshold_t2i, threshold_i2t=g.threshold_i2t,
                                weight_t2i=g.weight_t2i, weight_i2t=g.weight_i2t, rule=g.eval_rule)
                gi = pair_logprobs(steps[chosen_rounds.get("image", 0)][0])[0].float().cpu().numpy()
                gt = pair_logprobs(steps[chosen_rounds.get("text", 0)][1])[0].float().cpu().numpy()
                a = i2t_h[0].cpu().numpy()
                flp = pair_logprobs(fuse_logits(logits["image"], logits["text"], i2t_h))[0].float().cpu().numpy()
            oi, ot = _decode(gi, decoder), _decode(gt, decoder)
            res["variants"]["guided"] = {
                "image_order": oi, "sentence_order": ot, "rounds": {"image": chosen_rounds.get("image", 0), "text": chosen_rounds.get("text", 0)},
                "image_confidence": _adjacent(_combined_prob(gi), oi), "sentence_confidence": _adjacent(_combined_prob(gt), ot),
            }
            of = _decode(flp, decoder)
            res["variants"]["fused"] = {"image_order": of, "sentence_order": [int(a[k]) for k in of], "confidence": _adjacent(_combined_prob(flp), of)}
            res["pairing"] = [[int(k), int(a[k])] for k in range(len(a))]
            res["pairing_score"] = [float(scores[0, k, a[k]]) for k in range(len(a))]
            res["image_order"], res["sentence_order"] = of, res["variants"]["fused"]["sentence_order"]
            res["mode"] = "fused"
        else:
            if "image" in lps:
                res["image_order"] = res["variants"]["image_only"]["order"]
            if "text" in lps:
                res["sentence_order"] = res["variants"]["text_only"]["order"]
            res["mode"] = "unimodal"
        results.append(res)
    return results


def stories_from_args(images: list[str] | None, sentences: list[str] | None) -> list[Story]:
    """One story from CLI lists (either may be absent)."""
    images, sentences = images or [], sentences or []
    if not images and not sentences:
        raise DataError("give --images and/or --sentences, or --jsonl")
    n = max(len(images), len(sentences))
    items = [Item(image=str(Path(images[k])) if k < len(images) else None, sentence=sentences[k] if k < len(sentences) else None) for k in range(n)]
    return [Story("album", items)]
