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

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..capture_time import MODES, placed_by_time, precedence, read_capture_times, times_in_effect
from ..data.features import build_features, make_batch
from ..data.readers import Item, Story
from ..decode import MAX_EXACT
from ..errors import DataError
from ..result import Inference, StoryOrders, Variant, decode_output, inference_settings

SCHEMA_VERSION = 1


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


def _forward(model, story_id: str, imgs: list, sents: list, use: dict, cross: bool, rounds: dict[str, int]):
    """``[(ForwardOutput, its modalities)]``: one forward over both modalities when they align, else one per
    modality; then how many sentences the text backbone cut at its token limit meanwhile, and that backbone."""
    model.eval()
    text_bb = getattr(model.encoders().get("text"), "backbone", None)
    cut_before = getattr(text_bb, "truncated", 0)
    if cross:
        runs = [(model(_story_batch(model, story_id, imgs, sents), max(rounds.values())), ("image", "text"))]
    else:
        runs = []
        for mod in (m for m in ("image", "text") if use[m]):
            b = _story_batch(model, story_id, imgs if mod == "image" else [], sents if mod == "text" else [])
            runs.append((model(b, modalities=(mod,)), (mod,)))
    return runs, getattr(text_bb, "truncated", 0) - cut_before, text_bb


@torch.no_grad()
def _story_orders(
    model, story_id: str, imgs: list, sents: list, use: dict, cross: bool, inference: Inference, before
) -> tuple:
    """``(StoryOrders, guided rounds, sentences cut, text backbone)`` of one album: round 0 of each modality,
    and with both aligned the guided rounds and the fused order; ``before``: capture-time precedence or None."""
    rounds = inference.guided_rounds(before is not None)
    runs, cut, text_bb = _forward(model, story_id, imgs, sents, use, cross, rounds)
    lengths = {"image": [len(imgs)], "text": [len(sents)]}
    bound = None if before is None else before[None]
    orders = StoryOrders()
    for fw, mods in runs:
        want = {m: (0, rounds[m]) if cross else (0,) for m in mods}
        got = decode_output(fw, lengths, inference, rounds=want, modalities=mods, fused=cross, before=bound)[0]
        orders.image.update(got.image)
        orders.text.update(got.text)
        if cross:
            orders.fused, orders.fused_sentences = got.fused, got.fused_sentences
            orders.pairing, orders.pairing_score = got.pairing, got.pairing_score
    return orders, rounds, cut, text_bb


def _variants(orders: StoryOrders, rounds: dict[str, int], cross: bool) -> dict:
    """The result's ``variants`` (``order --json`` schema 1), keyed by :class:`~iterwego.result.Variant`."""
    out: dict = {}
    for m, variant in (("image", Variant.IMAGE_ONLY), ("text", Variant.TEXT_ONLY)):
        if 0 in orders.rounds(m):
            out[variant.value] = {"order": orders.rounds(m)[0].order, "confidence": orders.rounds(m)[0].confidence}
    if cross:
        gi, gt = orders.image[rounds["image"]], orders.text[rounds["text"]]
        out[Variant.GUIDED.value] = {
            "image_order": gi.order,
            "sentence_order": gt.order,
            "rounds": rounds,
            "image_confidence": gi.confidence,
            "sentence_confidence": gt.confidence,
        }
        f = orders.fused
        out[Variant.FUSED.value] = {
            "image_order": f.order,
            "sentence_order": orders.fused_sentences,
            "confidence": f.confidence,
        }
    return out


def _headline(orders: StoryOrders, variants: dict, cross: bool) -> dict:
    """The result's headline orders: the fused order when images and sentences align, else each modality's own."""
    if cross:
        a = orders.pairing
        return {
            "pairing": [[k, a[k]] for k in range(len(a))],
            "pairing_score": orders.pairing_score,
            "image_order": orders.fused.order,
            "sentence_order": orders.fused_sentences,
            "mode": "fused",
        }
    out: dict = {}
    if Variant.IMAGE_ONLY.value in variants:
        out["image_order"] = variants[Variant.IMAGE_ONLY.value]["order"]
    if Variant.TEXT_ONLY.value in variants:
        out["sentence_order"] = variants[Variant.TEXT_ONLY.value]["order"]
    return {**out, "mode": "unimodal"}


def order_story(model, s: Story, *, inference: Inference | None = None, capture_time: str = "auto") -> dict:
    """Order one story's images and sentences (the given order is ignored); see :func:`order_stories`."""
    inference = inference or inference_settings(model.cfg)
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
    orders, rounds, cut, text_bb = _story_orders(model, s.id, imgs, sents, use, cross, inference, before)
    res["variants"] = _variants(orders, rounds, cross)
    res.update(_headline(orders, res["variants"], cross))
    if orders.fell_back():
        notes.append(
            f"{max(len(imgs), len(sents))} items: more than the exact decoder's {MAX_EXACT}, "
            "so the beam decoder was used"
        )
    if cut:
        notes.append(f"{cut} sentence(s) longer than {getattr(text_bb, 'max_length', '?')} tokens were truncated")
    if notes:
        res["note"] = "; ".join(notes)
    return res


def check_orderable(stories: list[Story]) -> None:
    """Refuse (one-line ``DataError``, naming the file, line and story) a story with fewer than 2 items."""
    for s in stories:
        if len(s.items) < 2:
            raise DataError(
                f"a story needs at least 2 items to order, got {len(s.items)}",
                path=s.meta.get("source"),
                line=s.meta.get("line"),
                story=s.id,
            )


def order_stories(
    model,
    stories: list[Story],
    *,
    chosen_rounds: dict | None = None,
    decoder: str | None = None,
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

    The run's inference settings (``model.cfg.inference``: the rounds chosen on validation, also with capture
    times; ``train.decoder``; ``orderer.rank_weight``) apply; ``decoder``, ``chosen_rounds`` and
    ``capture_rounds`` (``{"image": r, "text": r}``) override them.

    ``capture_time`` (``auto``, ``on``, ``off``; see :mod:`iterwego.capture_time`): with
    ``auto``, when at least two photos carry an EXIF capture time, every pair of photos
    with distinct times from the same camera is ordered by them in every image variant.
    ``result["capture_time"]["photos"][k]["placed_by"]`` says whether photo k's place came
    from its ``"capture time"`` or from the ``"model"``; the guided image round is then the one chosen
    on validation with capture times.
    """
    if capture_time not in MODES:
        raise ValueError(f"capture_time must be one of {', '.join(MODES)}, got {capture_time!r}")
    check_orderable(stories)
    inference = inference_settings(model.cfg, decoder)
    if chosen_rounds is not None or capture_rounds is not None:
        inference = replace(
            inference,
            rounds=inference.rounds if chosen_rounds is None else dict(chosen_rounds),
            capture_rounds=inference.capture_rounds if capture_rounds is None else dict(capture_rounds),
        )
    return [order_story(model, s, inference=inference, capture_time=capture_time) for s in stories]


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
