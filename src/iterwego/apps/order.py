"""Ordering new albums: the job a user comes for.

:func:`order_stories` takes stories whose items are in *arbitrary* order
(no gold), runs both orderers, the aligner and the validation-chosen number
of guidance rounds, and returns per story the recovered orders, the
image-sentence pairing and the confidence of each adjacent step, for every
variant (image only, sentences only, guided, fused).

Photos' EXIF capture times (:mod:`iterwego.capture_time`) fix the order of
every pair of photos they can compare, in every image variant; the result
says per photo whether its place came from its capture time or from the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..capture_time import MODES, pin_logits, placed_by_time, precedence, read_capture_times, times_in_effect
from ..data.features import build_features, make_batch
from ..data.readers import Item, Story
from ..decode import MAX_EXACT, combine, decode_story, pair_logprobs
from ..errors import DataError
from ..fusion import sentence_order

SCHEMA_VERSION = 1


def _adjacent(p: np.ndarray, order: list[int]) -> list[float]:
    """P(order[k] before order[k+1]) under the combined pair probabilities."""
    return [float(p[a, b]) for a, b in zip(order, order[1:])]


def _decoded(logits, decoder: str, before: np.ndarray | None = None, unary=None) -> tuple[list[int], list[float], bool]:
    """(order, confidence of each adjacent step, fell back to beam) of one story's ``(1, n, n, 2)`` logits.

    ``before`` (capture-time precedence on these slots) pins those pairs to probability 1/0 and binds the decoder;
    ``unary``: the story's ``(1, n, P)`` position terms (rank heads), or None.
    """
    if before is not None:
        logits = pin_logits(logits, before[None])
    lp = pair_logprobs(logits)[0].float().cpu().numpy()
    n = lp.shape[0]
    u = None if unary is None or unary.shape[-1] < n else unary[0, :n, :n].double().cpu().numpy()
    order, fell_back = decode_story(lp, decoder, before=before, unary=u)
    return order, _adjacent(np.exp(combine(lp)), order), fell_back


def _capture_evidence(imgs: list, mode: str) -> tuple[list, np.ndarray | None]:
    """(capture time per photo, precedence matrix or None when times are not used) under ``--capture-time mode``."""
    times = read_capture_times(imgs) if mode != "off" else [None] * len(imgs)
    return times, (precedence(times) if imgs and times_in_effect(mode, times) else None)


def _capture_summary(mode: str, times: list, before: np.ndarray | None) -> tuple[dict, list[str]]:
    """The result's ``capture_time`` entry (per photo: time, camera, placed by) and notes for the user."""
    by = placed_by_time(before) if before is not None else np.zeros(len(times), bool)
    photos = [
        {
            "time": t.iso() if t else None,
            "camera": (t.camera or None) if t else None,
            "placed_by": "capture time" if by[k] else "model",
        }
        for k, t in enumerate(times)
    ]
    timed = sum(t is not None for t in times)
    notes = []
    if before is not None and timed >= 2 and not by.any():
        notes.append(
            f"capture times: {timed} photos carry one but no two can be compared "
            "(equal times or different cameras); the model placed every photo"
        )
    elif mode == "on" and timed < 2:
        notes.append(f"capture times: {timed} photo(s) carry one, nothing to compare; the model placed every photo")
    return {"mode": mode, "used": before is not None, "photos": photos}, notes


def _notes(imgs: list, sents: list, cross: bool) -> list[str]:
    if imgs and sents and len(imgs) != len(sents):
        return [f"{len(imgs)} images but {len(sents)} sentences: each modality is ordered alone"]
    if imgs and sents and not cross:
        return ["this run cannot align images and sentences: each modality is ordered alone"]
    return []


def _story_batch(model, story_id: str, imgs: list, sents: list):
    """Features of one album, as a one-story batch in the order given (it carries no gold).

    With both lists the items are paired by position for the feature index only; the model never reads that pairing.
    """
    encs = model.encoders()
    dtype = model.cfg.encoder.feature_dtype  # the rounding the model was trained on
    if imgs and sents:
        sets, feats = build_features(
            encs, {"x": [Story(story_id, [Item(image=i, sentence=t) for i, t in zip(imgs, sents)])]}, dtype=dtype
        )
    else:
        its = [Item(image=p) for p in imgs] if imgs else [Item(sentence=t) for t in sents]
        mod = "image" if imgs else "text"
        sets, feats = build_features({mod: encs[mod]}, {"x": [Story(story_id, its)]}, cross_modal=False, dtype=dtype)
    return make_batch(sets["x"], [0], np.random.default_rng(0), feats, shuffle=False).to(
        next(model.parameters()).device
    )


@torch.no_grad()
def order_story(
    model,
    s: Story,
    *,
    chosen_rounds: dict | None = None,
    decoder: str = "exact",
    capture_time: str = "auto",
    capture_rounds: dict | None = None,
) -> dict:
    """Order one story's images and sentences (the given order is ignored); see :func:`order_stories`."""
    chosen = {"image": 0, "text": 0, **(chosen_rounds or {})}
    imgs = [it.image for it in s.items if it.image is not None]
    sents = [it.sentence for it in s.items if it.sentence is not None]
    res: dict = {"schema": SCHEMA_VERSION, "id": s.id, "images": imgs, "sentences": sents, "variants": {}}
    use = {"image": bool(imgs) and model.image is not None, "text": bool(sents) and model.text is not None}
    cross = use["image"] and use["text"] and len(imgs) == len(sents) and model.aligner is not None
    notes = _notes(imgs, sents, cross)
    times, before = _capture_evidence(imgs if use["image"] else [], capture_time)
    if use["image"]:
        res["capture_time"], time_notes = _capture_summary(capture_time, times, before)
        notes += time_notes
    if before is not None and capture_rounds:
        chosen["image"] = capture_rounds.get("image", chosen["image"])  # the round chosen on validation with times
    model.eval()
    # the text backbone counts sentences it cut at its token limit; the user should hear about them
    text_bb = getattr(model.encoders().get("text"), "backbone", None)
    cut_before = getattr(text_bb, "truncated", 0)
    out = {}
    if cross:
        out["both"] = model(_story_batch(model, s.id, imgs, sents), max(chosen["image"], chosen["text"]))
    else:
        for mod in ("image", "text"):
            if use[mod]:
                b = _story_batch(model, s.id, imgs if mod == "image" else [], sents if mod == "text" else [])
                out[mod] = model(b, modalities=(mod,))
    cut = getattr(text_bb, "truncated", 0) - cut_before
    fell_back = False
    w = model.cfg.orderer.rank_weight
    for m in ("image", "text"):
        fw = out.get("both", out.get(m))
        if fw is None or not getattr(fw, m):
            continue
        o, conf, fb = _decoded(fw.logits(m, 0), decoder, before if m == "image" else None, fw.unary(m, w))
        fell_back |= fb
        res["variants"][f"{m}_only"] = {"order": o, "confidence": conf}
    if cross:
        fw = out["both"]
        ri, rt = chosen["image"], chosen["text"]
        oi, ci, fbi = _decoded(fw.logits("image", ri), decoder, before, fw.unary("image", w, ri))
        ot, ct, fbt = _decoded(fw.logits("text", rt), decoder, None, fw.unary("text", w, rt))
        of, cf, fbf = _decoded(fw.fused, decoder, before, fw.unary("fused", w))
        fell_back |= fbi or fbt or fbf
        a = fw.pairing[0].cpu().numpy()
        res["variants"]["guided"] = {
            "image_order": oi,
            "sentence_order": ot,
            "rounds": chosen,
            "image_confidence": ci,
            "sentence_confidence": ct,
        }
        res["variants"]["fused"] = {
            "image_order": of,
            "sentence_order": sentence_order(of, a, len(sents)),
            "confidence": cf,
        }
        res["pairing"] = [[int(k), int(a[k])] for k in range(len(a))]
        res["pairing_score"] = [float(fw.scores[0, k, a[k]]) for k in range(len(a))]
        res["image_order"], res["sentence_order"] = of, res["variants"]["fused"]["sentence_order"]
        res["mode"] = "fused"
    else:
        if "image_only" in res["variants"]:
            res["image_order"] = res["variants"]["image_only"]["order"]
        if "text_only" in res["variants"]:
            res["sentence_order"] = res["variants"]["text_only"]["order"]
        res["mode"] = "unimodal"
    if fell_back:
        notes.append(
            f"{max(len(imgs), len(sents))} items: more than the exact decoder's {MAX_EXACT}, "
            "so the beam decoder was used"
        )
    if cut:
        notes.append(f"{cut} sentence(s) longer than {getattr(text_bb, 'max_length', '?')} tokens were truncated")
    if notes:
        res["note"] = "; ".join(notes)
    return res


def order_stories(
    model,
    stories: list[Story],
    *,
    chosen_rounds: dict | None = None,
    decoder: str = "exact",
    progress: bool = False,
    capture_time: str = "auto",
    capture_rounds: dict | None = None,
) -> list[dict]:
    """Order each story's images and sentences as given (the given order is ignored).

    A story may have images only, sentences only, or both; with both in
    equal numbers the guided and fused variants are computed, otherwise
    each modality is ordered alone and ``note`` says so. Each story runs
    through :meth:`iterwego.model.IterWeGO.forward` alone, which keeps memory
    flat for large albums (batching is for evaluation).

    ``capture_time`` (``auto``, ``on``, ``off``; see :mod:`iterwego.capture_time`): with
    ``auto``, when at least two photos carry an EXIF capture time, every pair of photos
    with distinct times from the same camera is ordered by them in every image variant.
    ``result["capture_time"]["photos"][k]["placed_by"]`` says whether photo k's place came
    from its ``"capture time"`` or from the ``"model"``. ``capture_rounds`` (a run's
    ``meta["capture_time"]["chosen_rounds"]``) replaces the guided image round when times are used.
    """
    if capture_time not in MODES:
        raise ValueError(f"capture_time must be one of {', '.join(MODES)}, got {capture_time!r}")
    for s in stories:
        if len(s.items) < 2:
            raise DataError(
                f"a story needs at least 2 items to order, got {len(s.items)}",
                path=s.meta.get("source"),
                line=s.meta.get("line"),
                story=s.id,
            )
    return [
        order_story(
            model,
            s,
            chosen_rounds=chosen_rounds,
            decoder=decoder,
            capture_time=capture_time,
            capture_rounds=capture_rounds,
        )
        for s in stories
    ]


def stories_from_args(images: list[str] | None, sentences: list[str] | None) -> list[Story]:
    """One story from CLI lists (either may be absent)."""
    images, sentences = images or [], sentences or []
    if not images and not sentences:
        raise DataError("give --images and/or --sentences, or --jsonl")
    n = max(len(images), len(sentences))
    items = [
        Item(
            image=str(Path(images[k])) if k < len(images) else None,
            sentence=sentences[k] if k < len(sentences) else None,
        )
        for k in range(n)
    ]
    return [Story("album", items)]


def _when(photo: dict) -> str:
    return photo["time"].replace("T", " ")


def placed_tags(result: dict) -> list[str]:
    """Per input photo of an :func:`order_stories` result, what placed it ("" when capture times were not used)."""
    ct = result.get("capture_time") or {}
    if not ct.get("used"):
        return [""] * len(result.get("images") or [])
    return [
        f"placed by capture time {_when(p)}" if p["placed_by"] == "capture time" else "placed by the model"
        for p in ct["photos"]
    ]


def capture_line(result: dict) -> str:
    """One line for people: which photos their capture time placed, and which the model placed."""
    ct, names = result["capture_time"], [Path(p).name for p in result["images"]]
    timed = [k for k, p in enumerate(ct["photos"]) if p["placed_by"] == "capture time"]
    if ct["mode"] == "off":
        return "capture times: off; the model placed every photo"
    if not timed:
        n = sum(p["time"] is not None for p in ct["photos"])
        return f"capture times: {n} of {len(names)} photos carry one; the model placed every photo"
    rest = [names[k] for k in range(len(names)) if k not in timed]
    by_time = ", ".join(f"{names[k]} ({_when(ct['photos'][k])})" for k in timed)
    line = f"capture times: {len(timed)} of {len(names)} photos placed by their capture time: {by_time}"
    return line + (f"; placed by the model: {', '.join(rest)}" if rest else "")
