"""The evaluator: one object used by training (validation) and by ``iterwego evaluate``.

For each story it computes both orderers' pair logits, the aligner's
scores, every inference round 0..R of the shared guidance step, decodes each
round into an order per modality, and fused decoding (both modalities'
evidence on one-to-one aligned pairs, decoded once and mapped back).

Photos' EXIF capture times are read only when asked (``capture_time=True``):
they can leak the gold order, so the time-bound orders are kept apart from
the others and every table row that uses them says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..aligner import alignment_hits
from ..batch import Batch
from ..capture_time import placed_by_time, precedence, read_capture_times
from ..config import GuidanceConfig
from ..data.features import StorySet, gather, plan_batches, prefetch
from ..decode import pair_logprobs
from ..device import autocast
from ..metrics import order_metrics
from ..result import Inference, decode_output

HEADLINE = ("acc", "pmr", "tau")


def pick(m: dict) -> dict:
    return {k: float(m[k]) for k in HEADLINE}


@dataclass
class EvalResult:
    """Metrics per round and modality; ``orders`` keeps predictions (gold ids) for reports."""

    rounds: dict[str, list[dict]] = field(default_factory=dict)  # modality -> [full metrics dict per round]
    fused: dict | None = None
    alignment_accuracy: float | None = None
    orders: dict[str, list[list[list[int]]]] = field(default_factory=dict)  # key -> per round/variant -> per story
    confidences: dict[str, list[list[float]]] = field(
        default_factory=dict
    )  # modality -> per story adjacent-pair P (round 0)
    story_ids: list[str] = field(default_factory=list)
    decoder_fallbacks: int = 0
    decoder: str = ""  # the decoder the orders come from
    authors: dict | None = None  # the authors' evaluation protocol (authors_protocol), when asked for
    # with capture times (only when asked): {"image": [metrics per round], "fused": {...}, "placed_by_time": share}
    timed: dict | None = None
    fusion: str = "sum"  # how the fused order was made: "sum" of pair log-odds | "orderer" (the fused orderer)
    positions: bool = False  # whether the decoders read position terms (rank heads)

    def choose_rounds(self) -> dict[str, int]:
        """Best round per modality by PMR, then tau, then fewer rounds. Call this on validation results only."""
        return {mod: _best_round(rs) for mod, rs in self.rounds.items()}

    def choose_capture_rounds(self) -> dict[str, int]:
        """The best image round with capture times (same rule); empty without them. Validation results only."""
        return {"image": _best_round(self.timed["image"])} if self.timed and self.timed.get("image") else {}

    def selection_score(self) -> float:
        """Validation score for model selection: mean PMR of each modality's best round."""
        ch = self.choose_rounds()
        vals = [self.rounds[m][r]["pmr"] for m, r in ch.items()]
        return float(np.mean(vals)) if vals else 0.0

    def report(self, chosen: dict[str, int], capture_chosen: dict[str, int] | None = None) -> dict:
        """The documented JSON shape; ``chosen`` (and ``capture_chosen``, with times) must come from validation."""
        out: dict = {}
        for mod in ("image", "text"):
            if mod not in self.rounds:
                continue
            rs = self.rounds[mod]
            r = min(chosen.get(mod, 0), len(rs) - 1)
            out[mod] = {
                "unimodal": pick(rs[0]),
                "rounds": [pick(m) for m in rs],
                "chosen_round": r,
                "guided": pick(rs[r]),
            }
        if self.fused is not None:
            out["fused"] = pick(self.fused)
            out["fusion"] = self.fusion
        if self.positions:
            out["position_terms"] = True
        if self.alignment_accuracy is not None:
            out["alignment_accuracy"] = float(self.alignment_accuracy)
        if self.authors:
            out["authors_protocol"] = self.authors
        if self.timed is not None:
            out["capture_time"] = self._timed_report({**chosen, **(capture_chosen or {})})
        return out

    def _timed_report(self, chosen: dict[str, int]) -> dict:
        t = self.timed
        out: dict = {"placed_by_time": float(t["placed_by_time"])}
        if t.get("image"):
            r = min(chosen.get("image", 0), len(t["image"]) - 1)
            out["image"] = {"rounds": [pick(m) for m in t["image"]], "chosen_round": r, "guided": pick(t["image"][r])}
        if t.get("fused") is not None:
            out["fused"], out["fused_text"] = pick(t["fused"]), t["fused"]["text"]
        return out


def _best_round(rs: list[dict]) -> int:
    keyed = [(m["pmr"], m["tau"] if not math.isnan(m["tau"]) else -2.0, -r) for r, m in enumerate(rs)]
    return -max(keyed)[2]


def capture_precedences(stories) -> list[np.ndarray]:
    """Per story, the capture-time precedence of its photos in gold order (:func:`iterwego.capture_time.precedence`)."""
    return [precedence(read_capture_times(s.images)) for s in stories]


AUTHORS_ROUNDS = (1, 2, 3)  # the rounds the authors' eval.py runs (its loop index k applies k + 1 steps)


def authors_protocol(res: EvalResult) -> dict:
    """What the authors' released evaluation reports: per modality, the round among 1-3 with the best Acc
    *on the evaluated split itself* (the first on ties, as their strict ``<`` keeps it), decoded by tsort.

    For comparison with their published numbers only: choosing the round on test flatters the result.
    ``res`` must be decoded with ``tsort`` over at least 3 rounds.
    """
    if res.decoder != "tsort":
        raise ValueError(f"the authors' protocol decodes with tsort, not {res.decoder!r}")
    out: dict = {"decoder": "tsort", "rounds_searched": list(AUTHORS_ROUNDS), "chosen_on": "the evaluated split"}
    for mod, rs in res.rounds.items():
        cands = [r for r in AUTHORS_ROUNDS if r < len(rs)]
        if cands:
            best = max(cands, key=lambda r: (rs[r]["acc"], -r))
            out[mod] = {"round": best, **pick(rs[best])}
    return out


class Evaluator:
    """Evaluate a model on a fixed, seeded presentation of a story set."""

    def __init__(
        self,
        ss: StorySet,
        feats: dict,
        guidance: GuidanceConfig | None = None,
        *,
        mapping: str | None = None,
        decoder: str = "exact",
        rounds: int | None = None,
        batch_size: int = 64,
        seed: int = 1234,
        device: str | torch.device = "cpu",
        amp: str = "auto",
        dist_ctx=None,
        capture_time: bool = False,
    ):
        """``guidance`` / ``mapping`` default to the evaluated model's config; ``rounds`` to ``guidance.max_rounds``.

        ``feats`` maps bank names to tensors or stored features; the presentation (story batches, item
        shuffles) is fixed here from ``seed``, and features are read batch by batch at each evaluation.
        ``capture_time=True`` reads the photos' EXIF capture times and adds the orders bound by them
        (``EvalResult.timed``); the other results are the same either way.
        """
        self.ss, self.feats, self.g, self.mapping, self.decoder = ss, feats, guidance, mapping, decoder
        self.capture = capture_precedences(ss.stories) if capture_time and ss.image_rows is not None else None
        self.rounds = rounds
        rng = np.random.default_rng(seed)
        mods = tuple(m for m in ("image", "text") if m in feats)
        self.plans = plan_batches(ss, batch_size, rng, mods, shuffle_stories=False)
        self.device, self.amp = torch.device(device), amp
        self.positions = True  # decode with the rank heads' position terms (training: only once they have learned)
        self.rank, self.world = (dist_ctx.rank, dist_ctx.world) if dist_ctx is not None and dist_ctx.enabled else (0, 1)

    @property
    def batches(self) -> list[Batch]:
        """Every batch of the fixed presentation, read into host memory at once (tests, one-off inspection)."""
        return [gather(p, self.feats) for p in self.plans]

    def loaded(self, *, mine: bool = True):
        """``(batch number, batch on the device)``, read ahead of use; ``mine``: only this process's share."""
        ids = [bi for bi in range(len(self.plans)) if not mine or bi % self.world == self.rank]
        pin = self.device.type == "cuda"
        for bi, b in prefetch(lambda bi: (bi, gather(self.plans[bi], self.feats, pin=pin)), ids):
            yield bi, b.to(self.device)

    @torch.no_grad()
    def __call__(self, model, *, keep_orders: bool = False, only: str | None = None) -> EvalResult:
        """Evaluate ``model``; ``only="image"|"text"`` evaluates that orderer alone (round 0).

        Under data-parallel training each process evaluates every W-th batch
        and the per-batch results are gathered, so every process ends with the
        same, complete result.
        """
        was = model.training
        model.eval()
        res = EvalResult(story_ids=[s.id for s in self.ss.stories], decoder=self.decoder)
        res.fusion = "orderer" if getattr(model, "fuser", None) is not None else "sum"
        res.positions = self.positions and any(
            getattr(getattr(model, m), "ranker", None) is not None for m in ("image", "text")
        )
        mods = [m for m in ("image", "text") if getattr(model, m) is not None and m in self.feats and only in (None, m)]
        cross = len(mods) == 2 and model.aligner is not None
        g = self.g or model.cfg.guidance
        n_rounds = (g.max_rounds if self.rounds is None else self.rounds) if cross else 0
        parts = {bi: self._batch(model, b, mods, cross, n_rounds, keep_orders) for bi, b in self.loaded()}
        if self.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, parts)
            parts = {k: v for g in gathered for k, v in g.items()}
        parts = [parts[bi] for bi in sorted(parts)]
        cat = lambda key: [x for p in parts for x in p[key]]  # noqa: E731
        for m in mods:
            gold = cat(f"gold/{m}")
            rounds = [cat(f"{m}/round{r}") for r in range(n_rounds + 1)]
            res.rounds[m] = [order_metrics(p, gold) for p in rounds]
            if keep_orders:
                res.confidences[m] = cat(f"conf/{m}")
                for r, p in enumerate(rounds):
                    res.orders[f"{m}/round{r}"] = p
        res.decoder_fallbacks = sum(p["fallbacks"] for p in parts)
        if self.capture is not None and "image" in mods:
            res.timed = self._timed(cat, n_rounds, cross, keep_orders, res)
        if cross:
            fused_img, fused_txt = cat("fused/image"), cat("fused/text")
            gi, gt = cat("gold/image"), cat("gold/text")
            res.fused = order_metrics(fused_img, gi)
            res.fused["text"] = pick(order_metrics(fused_txt, gt))
            res.fused["both"] = pick(order_metrics(fused_img + fused_txt, gi + gt))
            res.alignment_accuracy = sum(p["align_hits"] for p in parts) / max(sum(p["align_total"] for p in parts), 1)
            if keep_orders:
                res.orders["fused/image"], res.orders["fused/text"] = fused_img, fused_txt
        model.train(was)
        return res

    def _timed(self, cat, n_rounds: int, cross: bool, keep_orders: bool, res: EvalResult) -> dict:
        gold = cat("gold/image")
        rounds = [cat(f"timed/image/round{r}") for r in range(n_rounds + 1)]
        photos = sum(len(b) for b in self.capture)
        out: dict = {
            "image": [order_metrics(p, gold) for p in rounds],
            "placed_by_time": sum(int(placed_by_time(b).sum()) for b in self.capture) / max(photos, 1),
        }
        if cross:
            fi, ft = cat("timed/fused/image"), cat("timed/fused/text")
            out["fused"] = order_metrics(fi, gold)
            out["fused"]["text"] = pick(order_metrics(ft, cat("gold/text")))
            if keep_orders:
                res.orders["timed/fused/image"], res.orders["timed/fused/text"] = fi, ft
        if keep_orders:
            for r, p in enumerate(rounds):
                res.orders[f"timed/image/round{r}"] = p
        return out

    def _batch(self, model, batch: Batch, mods: list[str], cross: bool, n_rounds: int, keep_orders: bool) -> dict:
        """Predictions of one batch as gold ids, in plain lists (so they can be gathered across processes)."""
        out: dict = {"fallbacks": 0, "align_hits": 0, "align_total": 0}
        with autocast(self.device, self.amp):
            fw = model(
                batch,
                n_rounds,
                guidance=self.g,
                mapping=self.mapping,
                modalities=tuple(mods),
                fuse=cross,
                positions=self.positions,
            )
        lengths = {m: batch.valid(m).sum(1).tolist() for m in batch.index}
        inference = Inference({}, {}, self.decoder, model.cfg.orderer.rank_weight)
        stories = decode_output(fw, lengths, inference, modalities=mods, fused=cross)
        pos = {m: batch.pos[m].cpu().numpy() for m in batch.index}
        gold = lambda m, b, slots: [int(pos[m][b, k]) for k in slots]  # noqa: E731
        for m in mods:
            out[f"gold/{m}"] = [list(range(int(n))) for n in lengths[m]]
            if keep_orders:
                out[f"conf/{m}"] = _adjacent_conf(pair_logprobs(fw.logits(m, 0)).exp(), batch, m)
            for r in range(len(getattr(fw, m))):
                out[f"{m}/round{r}"] = [gold(m, b, s.rounds(m)[r].order) for b, s in enumerate(stories)]
        out["fallbacks"] = sum(o.fell_back for s in stories for o in s.decoded())
        if cross:
            out["align_hits"], out["align_total"] = alignment_hits(fw.scores, batch)
            out["fused/image"] = [gold("image", b, s.fused.order) for b, s in enumerate(stories)]
            out["fused/text"] = [gold("text", b, s.fused_sentences) for b, s in enumerate(stories)]
        if self.capture is not None and "image" in mods:
            # bound by capture times: the same decodes again, so they add no fallbacks
            timed = decode_output(
                fw, lengths, inference, modalities=("image",), fused=cross, before=self._slot_precedence(batch)
            )
            for r in range(len(fw.image)):
                out[f"timed/image/round{r}"] = [gold("image", b, s.image[r].order) for b, s in enumerate(timed)]
            if cross:
                out["timed/fused/image"] = [gold("image", b, s.fused.order) for b, s in enumerate(timed)]
                out["timed/fused/text"] = [gold("text", b, s.fused_sentences) for b, s in enumerate(timed)]
        return out

    def _slot_precedence(self, batch: Batch) -> np.ndarray:
        """The stories' gold-order capture-time precedence, permuted into the batch's image slots."""
        pos = batch.pos["image"].cpu().numpy()
        out = np.zeros((len(pos), pos.shape[1], pos.shape[1]), dtype=bool)
        for b, sid in enumerate(batch.ids):
            p = pos[b][pos[b] >= 0]
            out[b, : len(p), : len(p)] = self.capture[sid][np.ix_(p, p)]
        return out


def _adjacent_conf(p: Tensor, batch: Batch, m: str) -> list[list[float]]:
    """P(gold item k before gold item k+1) for each adjacent gold pair (for confidence histograms)."""
    pos, idx = batch.pos[m].cpu().numpy(), batch.index[m].cpu().numpy()
    p = p.float().cpu().numpy()
    out = []
    for b in range(len(pos)):
        n = int((idx[b] >= 0).sum())
        slot_of = np.empty(n, np.int64)
        slot_of[pos[b, :n]] = np.arange(n)
        out.append([float(p[b, slot_of[k], slot_of[k + 1]]) for k in range(n - 1)])
    return out


#: The fused row's label per ``fusion.method``; "fused decoding" is 0.1/0.2's sum of pair log-odds.
FUSED_LABELS = {"sum": "fused decoding", "orderer": "fused orderer"}


def ceiling_of(name: str, modality: str) -> str:
    """Which ceiling a table row is measured against: its own modality's for the unimodal row, else the
    item-level fusion ceiling (guided and fused orders use both modalities)."""
    return modality if name.startswith("unimodal") else "fused"


def ceiling_share(name: str, m: dict | None, modality: str, ceilings: dict | None) -> float | None:
    """A table row's PMR over its ceiling (:func:`ceiling_of`); None without a ceiling or metrics, and for rows
    with capture times, which use information the ceilings do not count."""
    c = (ceilings or {}).get(ceiling_of(name, modality))
    return None if m is None or not c or "capture times" in name else m["pmr"] / c


def metric_rows(report: dict, fused_text: dict | None = None) -> list[tuple[str, dict | None, dict | None, bool]]:
    """The rows of every metric table (text and HTML): (variant, image metrics, text metrics, val-chosen row?)."""
    img, txt = report.get("image"), report.get("text")
    n_rounds = max(len(img["rounds"]) if img else 0, len(txt["rounds"]) if txt else 0)

    def get(d: dict | None, r: int) -> dict | None:
        return d["rounds"][r] if d and r < len(d["rounds"]) else None

    rows: list[tuple[str, dict | None, dict | None, bool]] = [
        ("unimodal (round 0)", img and img["unimodal"], txt and txt["unimodal"], False)
    ]
    rows += [(f"round {r}", get(img, r), get(txt, r), False) for r in range(1, n_rounds)]
    if img or txt:
        ci = f"{img['chosen_round']}" if img else "-"
        ct = f"{txt['chosen_round']}" if txt else "-"
        rows.append((f"guided (val-chosen: img {ci}, txt {ct})", img and img["guided"], txt and txt["guided"], True))
    if "fused" in report:
        rows.append((FUSED_LABELS[report.get("fusion", "sum")], report["fused"], fused_text or report["fused"], False))
    ct = report.get("capture_time") or {}
    if "image" in ct:
        rows.append(
            (
                f"guided + capture times (val-chosen: img {ct['image']['chosen_round']})",
                ct["image"]["guided"],
                None,
                False,
            )
        )
    if "fused" in ct:
        rows.append(
            (f"{FUSED_LABELS[report.get('fusion', 'sum')]} + capture times", ct["fused"], ct.get("fused_text"), False)
        )
    return rows


def capture_time_line(report: dict) -> str | None:
    """The table footer saying that (and how much) capture times were used, or None when they were not."""
    ct = report.get("capture_time")
    if ct is None:
        return None
    return (
        "rows '+ capture times' order photos by their EXIF capture times where two can be compared "
        f"({100 * ct['placed_by_time']:.1f}% of the photos placed by time); the other rows and the ceilings ignore them"
    )


def format_table(report: dict, ceilings: dict | None = None, title: str = "", fused_text: dict | None = None) -> str:
    """One table: Acc / PMR / tau for images and sentences, one row per variant; with ``ceilings``, each row's
    PMR as a share of its ceiling (:func:`ceiling_of`)."""
    rows = metric_rows(report, fused_text)
    fmt = lambda m: (
        "   -      -      -  " if m is None else f"{100 * m['acc']:5.1f}  {100 * m['pmr']:5.1f}  {m['tau']:+.3f}"
    )  # noqa: E731

    def share(name: str, m: dict | None, modality: str) -> str:
        v = ceiling_share(name, m, modality, ceilings)
        return "   -" if v is None else f"{100 * v:4.0f}"

    authors = report.get("authors_protocol")
    w = max([len(r[0]) for r in rows] + [len(_authors_name(authors)) if authors else 0]) + 2
    lines = []
    if title:
        lines.append(title)
    extra = ("  | PMR / ceiling (%)", "  |   img    txt") if ceilings else ("", "")
    lines.append((" " * w + "|      images (%)       |     sentences (%)   " + extra[0]).rstrip())
    lines.append(("variant".ljust(w) + "|  Acc    PMR    tau    |  Acc    PMR    tau  " + extra[1]).rstrip())
    lines.append("-" * w + "+" + "-" * 23 + "+" + "-" * 22 + ("-+" + "-" * 15 if ceilings else ""))
    for name, a, b, _ in rows:
        cells = f"  |  {share(name, a, 'image')}   {share(name, b, 'text')}" if ceilings else ""
        lines.append((name.ljust(w) + "| " + fmt(a) + "  | " + fmt(b) + cells).rstrip())
    if authors:
        lines.append(_authors_line(authors, w, fmt))
    if "alignment_accuracy" in report:
        lines.append(
            f"alignment accuracy (top-1 within story, image->sentence): {100 * report['alignment_accuracy']:.1f}%"
        )
    if capture_time_line(report):
        lines.append(capture_time_line(report))
    if report.get("position_terms"):
        lines.append(
            "round-0 and fused orders are decoded from pair and position terms (rank heads); guided rounds from "
            "their pair logits alone, as in the paper"
        )
    if ceilings:
        lines.append(
            "ceilings (Bayes-optimal PMR of the synthetic split): "
            f"images alone {100 * ceilings['image']:.1f}, sentences alone {100 * ceilings['text']:.1f}, "
            f"item-level fusion {100 * ceilings['fused']:.1f}; the unimodal row is measured against its own "
            "modality's, every other row against item-level fusion"
        )
    return "\n".join(lines)


def _authors_name(a: dict) -> str:
    rounds = ", ".join(f"{k} {a[m]['round']}" for m, k in (("image", "img"), ("text", "txt")) if m in a)
    return f"authors' protocol (test-chosen: {rounds})"


def _authors_line(a: dict, width: int, fmt) -> str:
    """The authors' protocol as a labelled row under the table; it never replaces the validation-chosen row."""
    row = _authors_name(a).ljust(width) + "| " + fmt(a.get("image")) + "  | " + fmt(a.get("text"))
    note = (
        "  ^ the authors' released evaluation, for comparison with their published numbers only:\n"
        "    the round with the best Acc among rounds 1-3 on THIS split (not validation), decoded by tsort"
    )
    return "-" * width + "+" + "-" * 23 + "+" + "-" * 22 + "\n" + row + "\n" + note
