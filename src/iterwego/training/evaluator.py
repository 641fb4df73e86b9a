"""The evaluator: one object used by training (validation) and by ``iterwego evaluate``.

For each story it computes both orderers' pair logits, the aligner's
scores, every inference round 0..R of the shared guidance step and the fused
order (one order over the aligned pairs, carried to the sentences), decodes them
with :func:`iterwego.result.decode_output` (as ``order`` does) and scores the
orders against gold. :func:`evaluate_run` evaluates a saved run, as ``iterwego evaluate`` does;
the tables people read live in :mod:`iterwego.tables`.

Photos' EXIF capture times are read only when asked (``capture_time=True``):
they can leak the gold order, so the time-bound orders are kept apart from
the others and every table row that uses them says so.
"""

from __future__ import annotations

import contextlib
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
from ..result import Inference, decode_output, inference_settings, orders_key

HEADLINE = ("acc", "pmr", "tau")


def pick(m: dict) -> dict:
    return {k: float(m[k]) for k in HEADLINE}


@dataclass
class EvalResult:
    """Metrics per round and modality; ``orders`` keeps predictions (gold ids) for reports."""

    rounds: dict[str, list[dict]] = field(default_factory=dict)  # modality -> [full metrics dict per round]
    fused: dict | None = None
    alignment_accuracy: float | None = None
    # orders_key(...) -> per story, the order as gold ids (with keep_orders)
    orders: dict[str, list[list[int]]] = field(default_factory=dict)
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
            if "text" in self.fused:  # the fused order carried to the sentences
                out["fused_text"] = pick(self.fused["text"])
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
            rounds = [cat(orders_key(m, r)) for r in range(n_rounds + 1)]
            res.rounds[m] = [order_metrics(p, gold) for p in rounds]
            if keep_orders:
                res.confidences[m] = cat(f"conf/{m}")
                for r, p in enumerate(rounds):
                    res.orders[orders_key(m, r)] = p
        res.decoder_fallbacks = sum(p["fallbacks"] for p in parts)
        if self.capture is not None and "image" in mods:
            res.timed = self._timed(cat, n_rounds, cross, keep_orders, res)
        if cross:
            fused_img, fused_txt = cat(orders_key("image")), cat(orders_key("text"))
            gi, gt = cat("gold/image"), cat("gold/text")
            res.fused = order_metrics(fused_img, gi)
            res.fused["text"] = pick(order_metrics(fused_txt, gt))
            res.fused["both"] = pick(order_metrics(fused_img + fused_txt, gi + gt))
            res.alignment_accuracy = sum(p["align_hits"] for p in parts) / max(sum(p["align_total"] for p in parts), 1)
            if keep_orders:
                res.orders[orders_key("image")], res.orders[orders_key("text")] = fused_img, fused_txt
        model.train(was)
        return res

    def _timed(self, cat, n_rounds: int, cross: bool, keep_orders: bool, res: EvalResult) -> dict:
        gold = cat("gold/image")
        rounds = [cat(orders_key("image", r, timed=True)) for r in range(n_rounds + 1)]
        photos = sum(len(b) for b in self.capture)
        out: dict = {
            "image": [order_metrics(p, gold) for p in rounds],
            "placed_by_time": sum(int(placed_by_time(b).sum()) for b in self.capture) / max(photos, 1),
        }
        if cross:
            fi, ft = cat(orders_key("image", timed=True)), cat(orders_key("text", timed=True))
            out["fused"] = order_metrics(fi, gold)
            out["fused"]["text"] = pick(order_metrics(ft, cat("gold/text")))
            if keep_orders:
                res.orders[orders_key("image", timed=True)], res.orders[orders_key("text", timed=True)] = fi, ft
        if keep_orders:
            for r, p in enumerate(rounds):
                res.orders[orders_key("image", r, timed=True)] = p
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
        f = model.cfg.fusion
        inference = Inference(
            {}, {}, self.decoder, model.cfg.orderer.rank_weight, sentences=f.sentences, pairing_weight=f.pairing_weight
        )
        stories = decode_output(fw, lengths, inference, modalities=mods, fused=cross)
        pos = {m: batch.pos[m].cpu().numpy() for m in batch.index}
        gold = lambda m, b, slots: [int(pos[m][b, k]) for k in slots]  # noqa: E731
        for m in mods:
            out[f"gold/{m}"] = [list(range(int(n))) for n in lengths[m]]
            if keep_orders:
                out[f"conf/{m}"] = _adjacent_conf(pair_logprobs(fw.logits(m, 0)).exp(), batch, m)
            for r in range(len(getattr(fw, m))):
                out[orders_key(m, r)] = [gold(m, b, s.rounds(m)[r].order) for b, s in enumerate(stories)]
        out["fallbacks"] = sum(o.fell_back for s in stories for o in s.decoded())
        if cross:
            out["align_hits"], out["align_total"] = alignment_hits(fw.scores, batch)
            out[orders_key("image")] = [gold("image", b, s.fused.order) for b, s in enumerate(stories)]
            out[orders_key("text")] = [gold("text", b, s.fused_sentences) for b, s in enumerate(stories)]
        if self.capture is not None and "image" in mods:
            # bound by capture times: the same decodes again, so they add no fallbacks
            timed = decode_output(
                fw, lengths, inference, modalities=("image",), fused=cross, before=self._slot_precedence(batch)
            )
            for r in range(len(fw.image)):
                out[orders_key("image", r, timed=True)] = [
                    gold("image", b, s.image[r].order) for b, s in enumerate(timed)
                ]
            if cross:
                out[orders_key("image", timed=True)] = [gold("image", b, s.fused.order) for b, s in enumerate(timed)]
                out[orders_key("text", timed=True)] = [gold("text", b, s.fused_sentences) for b, s in enumerate(timed)]
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


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` measured, with the inference rounds the guided rows use."""

    result: EvalResult  # metrics per round and variant (orders too with keep_orders)
    chosen: dict[str, int]  # guidance rounds per modality: the run's, or chosen on validation here
    capture_chosen: dict[str, int] | None  # the image round chosen with capture times (capture_time=True), or None
    stories: StorySet  # the evaluated split, in evaluation order
    meta: dict  # the run's meta.json

    def report(self) -> dict:
        """The metrics JSON (:meth:`EvalResult.report`) at the chosen rounds."""
        return self.result.report(self.chosen, self.capture_chosen)


def evaluate_run(
    run,
    data,
    split: str,
    *,
    fmt: str = "vist",
    image_dir=None,
    text_field: str = "text",
    decoder: str | None = None,
    progress: bool = True,
    keep_orders: bool = False,
    cache=None,
    load_kw: dict | None = None,
    authors: bool = False,
    capture_time: bool = False,
) -> RunEvaluation:
    """Evaluate a saved run (a directory or a Hub id) on ``split`` of ``data``, as ``iterwego evaluate`` does.

    The guided rows use the run's inference rounds (``cfg.inference``); a run without them (an imported
    checkpoint) has them chosen on validation here. ``decoder`` defaults to the run's ``train.decoder``.
    ``cache``: a :class:`~iterwego.data.cache.FeatureCache`, or None for a private store removed afterwards.
    With ``authors`` the result also carries the authors' evaluation protocol (``result.authors``). With
    ``capture_time`` the photos' EXIF times are read too, and the orders bound by them are kept apart.
    """
    from ..data.features import build_features
    from ..data.readers import load_split
    from ..device import pick_device
    from ..model import load_run

    model, meta = load_run(run, pick_device(), **(load_kw or {}))
    cfg = model.cfg
    inference = inference_settings(cfg, decoder)
    capture_chosen = (inference.capture_rounds or None) if capture_time else None
    need_val = not inference.chosen or (capture_time and not capture_chosen)
    splits = list(dict.fromkeys([split] + (["val"] if need_val else [])))
    stories = {sp: load_split(data, sp, fmt=fmt, image_dir=image_dir, text_field=text_field) for sp in splits}
    with _store(cache) as store:
        sets, feats = build_features(
            model.encoders(), stories, where=str(data), progress=progress, cache=store, dtype=cfg.encoder.feature_dtype
        )
        device = next(model.parameters()).device
        ev = lambda ss, dec=inference.decoder, rounds=None, times=capture_time: Evaluator(  # noqa: E731
            ss, feats, decoder=dec, rounds=rounds, seed=cfg.train.seed + 2, device=device, capture_time=times
        )
        val = ev(sets["val"])(model) if need_val else None
        chosen = inference.rounds if inference.chosen else val.choose_rounds()
        if capture_time and not capture_chosen:
            capture_chosen = val.choose_capture_rounds()
        result = ev(sets[split])(model, keep_orders=keep_orders)
        if authors:
            rounds = max(cfg.guidance.max_rounds, max(AUTHORS_ROUNDS))
            same = inference.decoder == "tsort" and cfg.guidance.max_rounds >= rounds
            result.authors = authors_protocol(result if same else ev(sets[split], "tsort", rounds, False)(model))
    return RunEvaluation(result, chosen, capture_chosen, sets[split], meta)


@contextlib.contextmanager
def _store(cache):
    """The shared cache, or a private store in a temporary directory removed afterwards (``--no-cache``)."""
    if cache is not None:
        yield cache
        return
    import tempfile

    from ..data.cache import FeatureCache

    with tempfile.TemporaryDirectory(prefix="iterwego-features-") as d:
        yield FeatureCache(d)
