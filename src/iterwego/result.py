"""One typed result: what the figure's output (:class:`iterwego.model.ForwardOutput`) decodes to, per story.

:func:`decode_output` is the one place where pair logits become orders: for each story of a batch it decodes
every requested guidance round of each modality and the fused logits, with the run's decoder and position
terms, optionally bound by the photos' capture-time precedence, and returns :class:`StoryOrders`. The
evaluator (every round, scored against gold), ``order`` / ``serve`` (round 0 and the validation-chosen rounds),
the HTML reports and the model card read these objects; none of them repeats the decoding.

The variants a user sees are named once, in :class:`Variant`; :class:`Inference` is the run's typed
inference settings (chosen rounds, rounds with capture times, decoder, rank weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np

from .capture_time import pin_logits, placed_by_time
from .config import Config
from .decode import combine, decode_story, pair_logprobs
from .fusion import pairing_positions, sentence_order

__all__ = [
    "Variant",
    "VARIANTS",
    "Inference",
    "Ordered",
    "StoryOrders",
    "decode_output",
    "inference_settings",
    "orders_key",
]


class Variant(str, Enum):
    """The orders a run gives for a story; the value is the key ``order --json`` writes under ``variants``."""

    IMAGE_ONLY = "image_only"  # the image orderer alone (round 0, with position terms)
    TEXT_ONLY = "text_only"  # the sentence orderer alone
    GUIDED = "guided"  # each modality after its validation-chosen guidance rounds
    FUSED = "fused"  # one order over the aligned (image, sentence) items, carried to the sentences


VARIANTS = tuple(Variant)


def orders_key(modality: str, rounds: int | None = None, *, timed: bool = False) -> str:
    """The key of the evaluator's kept orders (``EvalResult.orders``) holding ``modality``'s orders after
    ``rounds`` guidance rounds, or (``rounds=None``) the fused order carried to ``modality``; ``timed``: bound by
    capture times."""
    key = f"fused/{modality}" if rounds is None else f"{modality}/round{rounds}"
    return f"timed/{key}" if timed else key


@dataclass(frozen=True)
class Inference:
    """How a run orders: everything the decoding of :func:`decode_output` reads besides the logits."""

    rounds: dict[str, int]  # guidance rounds per modality ("image", "text") of the guided variant
    capture_rounds: dict[str, int]  # the guided rounds to use when capture times bind the photos (empty: rounds)
    decoder: str  # "exact" (beam above decode.MAX_EXACT items) | "tsort" | "beam"
    rank_weight: float  # weight of the rank heads' position terms (orderer.rank_weight)
    chosen: bool = True  # whether validation chose ``rounds`` (False: an imported checkpoint, rounds 0)
    sentences: str = "carried"  # how the fused order reaches the sentences (fusion.sentences)
    pairing_weight: float = 1.0  # weight of the soft pairing's position term when ``sentences`` is "decoded"

    def guided_rounds(self, timed: bool) -> dict[str, int]:
        """The guided variant's rounds per modality; with capture times the image round chosen with them."""
        out = {"image": 0, "text": 0, **self.rounds}
        return {**out, **self.capture_rounds} if timed else out


def inference_settings(cfg: Config, decoder: str | None = None) -> Inference:
    """The run's typed inference settings; ``decoder`` overrides ``train.decoder`` (``--decoder``)."""
    i = cfg.inference
    rounds = {m: r for m, r in (("image", i.image_rounds), ("text", i.text_rounds)) if r is not None}
    timed = {} if i.capture_image_rounds is None else {"image": i.capture_image_rounds}
    f = cfg.fusion
    return Inference(
        rounds, timed, decoder or cfg.train.decoder, cfg.orderer.rank_weight, i.chosen(), f.sentences, f.pairing_weight
    )


@dataclass
class Ordered:
    """One decoded order of one story's items (slot numbers: the items as the batch holds them)."""

    order: list[int]  # slots in predicted order
    confidence: list[float]  # P(order[k] before order[k+1]) under the decoded (and time-pinned) pair probabilities
    rounds: int  # guidance rounds behind it (0: the orderer alone, and the fused order)
    fell_back: bool  # the exact decoder was above decode.MAX_EXACT items and beam search decoded it
    timed: bool = False  # capture-time precedence bound it
    placed_by_time: list[bool] = field(default_factory=list)  # per slot, whether its capture time placed it (timed)


@dataclass
class StoryOrders:
    """Every decoded order of one story."""

    image: dict[int, Ordered] = field(default_factory=dict)  # guidance rounds -> the image order
    text: dict[int, Ordered] = field(default_factory=dict)  # guidance rounds -> the sentence order
    fused: Ordered | None = None  # the fused order on the image slots
    fused_sentences: list[int] | None = None  # the fused order on the sentence slots (carried or decoded)
    pairing: list[int] | None = None  # sentence slot paired with each image slot (-1: none)
    pairing_score: list[float | None] | None = None  # the aligner's score of each image's pair (None: unpaired)

    def rounds(self, modality: str) -> dict[int, Ordered]:
        return self.image if modality == "image" else self.text

    def decoded(self) -> list[Ordered]:
        """Every order decoded for the story (each round of each modality, the fused order)."""
        return [*self.image.values(), *self.text.values(), *([self.fused] if self.fused else [])]

    def fell_back(self) -> bool:
        return any(o.fell_back for o in self.decoded())


def _decode(logits, lengths: list[int], decoder: str, rounds: int, before, unary) -> list[Ordered]:
    """Decode a batch of ``(B, n, n, 2)`` logits into one :class:`Ordered` per story."""
    if before is not None:
        logits = pin_logits(logits, before)  # the steps' confidences show time-fixed pairs as certain
    lp = pair_logprobs(logits).float().cpu().numpy()
    u = None if unary is None else unary.double().cpu().numpy()
    out = []
    for b, n in enumerate(lengths):
        order, fell = decode_story(
            lp[b, :n, :n],
            decoder,
            before=None if before is None else before[b][:n, :n],
            unary=None if u is None or u.shape[-1] < n else u[b, :n, :n],
        )
        o = np.asarray(order, dtype=np.int64)
        conf = np.exp(combine(lp[b, :n, :n]))[o[:-1], o[1:]].tolist()
        placed = [] if before is None else placed_by_time(before[b][:n, :n]).tolist()
        out.append(Ordered([int(k) for k in order], conf, rounds, fell, before is not None, placed))
    return out


def decode_output(
    fw,
    lengths: dict[str, list[int]],
    inference: Inference,
    *,
    rounds: dict[str, Sequence[int]] | None = None,
    modalities: Sequence[str] = ("image", "text"),
    fused: bool = True,
    before: np.ndarray | None = None,
) -> list[StoryOrders]:
    """Decode a :class:`~iterwego.model.ForwardOutput` into one :class:`StoryOrders` per story.

    ``lengths``: items per story and modality. ``rounds``: per modality, the guidance rounds to decode (None,
    or a modality left out: every round ``fw`` computed). ``before``: ``(B, n_img, n_img)`` capture-time
    precedence on the image slots; it binds the image orders and the fused order (the sentences follow the
    fused order). Position terms go with round 0 and the fused order (:meth:`ForwardOutput.unary`).
    """
    w, dec = inference.rank_weight, inference.decoder
    out: list[StoryOrders] | None = None
    for m in modalities:
        logits = getattr(fw, m)
        if not logits:
            continue
        b_m = before if m == "image" else None
        for r in sorted(set((rounds or {}).get(m, range(len(logits))))):
            rr = min(r, len(logits) - 1)
            decoded = _decode(fw.logits(m, rr), lengths[m], dec, rr, b_m, fw.unary(m, w, rr))
            out = out or [StoryOrders() for _ in decoded]
            for s, o in zip(out, decoded):
                s.rounds(m)[r] = o
    if fused and fw.fused is not None:
        decoded = _decode(fw.fused, lengths["image"], dec, 0, before, fw.unary("fused", w))
        out = out or [StoryOrders() for _ in decoded]
        pairing = fw.pairing.cpu().numpy()
        scores = fw.scores.float().cpu().numpy()
        for b, (s, o) in enumerate(zip(out, decoded)):
            n = lengths["image"][b]
            a = pairing[b, :n]
            s.fused, s.fused_sentences = o, sentence_order(o.order, a, lengths["text"][b])
            s.pairing = [int(t) for t in a]
            s.pairing_score = [float(scores[b, k, t]) if t >= 0 else None for k, t in enumerate(a.tolist())]
        if inference.sentences == "decoded":
            _decode_fused_sentences(fw, out, lengths, inference)
    return out or []


def _decode_fused_sentences(fw, out: list[StoryOrders], lengths: dict[str, list[int]], inf: Inference) -> None:
    """Replace each story's carried fused sentence order by one decoded in the sentences' own items: the sentence
    orderer's round-0 pair and position terms, plus ``pairing_weight`` times the soft pairing's pull of each
    sentence to its image's step in the fused order (:func:`iterwego.fusion.pairing_positions`).

    Stories whose counts differ keep the carried order (a step without an image has no pull), and so does
    ``tsort``, which reads no position terms."""
    if not fw.text or fw.soft_pairing is None or inf.decoder == "tsort":
        return
    lp = pair_logprobs(fw.text[0]).float().cpu().numpy()
    own = fw.unary("text", inf.rank_weight)
    own = None if own is None else own.double().cpu().numpy()
    soft = fw.soft_pairing.cpu().numpy()
    for b, s in enumerate(out):
        n, m = lengths["image"][b], lengths["text"][b]
        if n != m or s.fused is None:
            continue
        u = inf.pairing_weight * pairing_positions(s.fused.order, soft[b, :n, :m])
        if own is not None and own.shape[-1] >= m:
            u = u + own[b, :m, :m]
        order, _ = decode_story(lp[b, :m, :m], inf.decoder, unary=u)
        s.fused_sentences = [int(k) for k in order]
