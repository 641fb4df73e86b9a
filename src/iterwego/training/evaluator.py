"""The evaluator: one object used by training (validation) and by ``iterwego evaluate``.

For each story it computes both orderers' pair logits, the aligner's
scores, every inference round 0..R of the shared guidance step, decodes each
round into an order per modality, and fused decoding (both modalities'
evidence on one-to-one aligned pairs, decoded once and mapped back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..aligner import alignment_hits
from ..batch import Batch
from ..config import GuidanceConfig
from ..data.features import StorySet, gather, plan_batches, prefetch
from ..decode import decode_stories, pair_logprobs
from ..device import autocast
from ..fusion import sentence_order
from ..metrics import order_metrics

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

    def choose_rounds(self) -> dict[str, int]:
        """Best round per modality by PMR, then tau, then fewer rounds. Call this on validation results only."""
        out = {}
        for mod, rs in self.rounds.items():
            keyed = [(m["pmr"], m["tau"] if not math.isnan(m["tau"]) else -2.0, -r) for r, m in enumerate(rs)]
            out[mod] = -max(keyed)[2]
        return out

    def selection_score(self) -> float:
        """Validation score for model selection: mean PMR of each modality's best round."""
        ch = self.choose_rounds()
        vals = [self.rounds[m][r]["pmr"] for m, r in ch.items()]
        return float(np.mean(vals)) if vals else 0.0

    def report(self, chosen: dict[str, int]) -> dict:
        """The documented JSON shape; ``chosen`` must come from validation."""
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
        if self.alignment_accuracy is not None:
            out["alignment_accuracy"] = float(self.alignment_accuracy)
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
    ):
        """``guidance`` / ``mapping`` default to the evaluated model's config; ``rounds`` to ``guidance.max_rounds``.

        ``feats`` maps bank names to tensors or stored features; the presentation (story batches, item
        shuffles) is fixed here from ``seed``, and features are read batch by batch at each evaluation.
        """
        self.ss, self.feats, self.g, self.mapping, self.decoder = ss, feats, guidance, mapping, decoder
        self.rounds = rounds
        rng = np.random.default_rng(seed)
        mods = tuple(m for m in ("image", "text") if m in feats)
        self.plans = plan_batches(ss, batch_size, rng, mods, shuffle_stories=False)
        self.device, self.amp = torch.device(device), amp
        self.rank, self.world = (dist_ctx.rank, dist_ctx.world) if dist_ctx is not None and dist_ctx.enabled else (0, 1)

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
        res = EvalResult(story_ids=[s.id for s in self.ss.stories])
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

    def _batch(self, model, batch: Batch, mods: list[str], cross: bool, n_rounds: int, keep_orders: bool) -> dict:
        """Predictions of one batch, as plain lists (so they can be gathered across processes)."""
        out: dict = {"fallbacks": 0, "align_hits": 0, "align_total": 0}
        with autocast(self.device, self.amp):
            fw = model(batch, n_rounds, guidance=self.g, mapping=self.mapping, modalities=tuple(mods), fuse=cross)
        for m in mods:
            out[f"gold/{m}"] = [list(range(int(n))) for n in batch.valid(m).sum(1).tolist()]
            if keep_orders:
                out[f"conf/{m}"] = _adjacent_conf(pair_logprobs(fw.logits(m, 0)).exp(), batch, m)
            for r, lg in enumerate(getattr(fw, m)):
                out[f"{m}/round{r}"] = self._decode(lg, batch, m, out)[0]
        if cross:
            out["align_hits"], out["align_total"] = alignment_hits(fw.scores, batch)
            out["fused/image"], slots = self._decode(fw.fused, batch, "image", out)
            pairing, n_txt, pos_t = (
                fw.pairing.cpu().numpy(),
                batch.valid("text").sum(1).tolist(),
                batch.pos["text"].cpu().numpy(),
            )
            out["fused/text"] = [
                [int(pos_t[b, s]) for s in sentence_order(o, pairing[b], n_txt[b])] for b, o in enumerate(slots)
            ]
        return out

    def _decode(self, logits: Tensor, batch: Batch, m: str, out: dict) -> tuple[list[list[int]], list[list[int]]]:
        """Decode each story: (orders as gold ids, orders as slots); counts beam fallbacks into ``out``."""
        lengths = batch.valid(m).sum(1).tolist()
        slots, fb = decode_stories(pair_logprobs(logits).float().cpu().numpy(), lengths, self.decoder)
        out["fallbacks"] += fb
        pos = batch.pos[m].cpu().numpy()
        return [[int(pos[b, s]) for s in order] for b, order in enumerate(slots)], slots


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
        rows.append(("fused decoding", report["fused"], fused_text or report["fused"], False))
    return rows


def format_table(report: dict, ceilings: dict | None = None, title: str = "", fused_text: dict | None = None) -> str:
    """One table: Acc / PMR / tau for images and sentences, one row per variant."""
    rows = metric_rows(report, fused_text)
    fmt = lambda m: (
        "   -      -      -  " if m is None else f"{100 * m['acc']:5.1f}  {100 * m['pmr']:5.1f}  {m['tau']:+.3f}"
    )  # noqa: E731
    w = max(len(r[0]) for r in rows) + 2
    lines = []
    if title:
        lines.append(title)
    lines.append(" " * w + "|      images (%)       |     sentences (%)")
    lines.append("variant".ljust(w) + "|  Acc    PMR    tau    |  Acc    PMR    tau")
    lines.append("-" * w + "+" + "-" * 23 + "+" + "-" * 22)
    for name, a, b, _ in rows:
        lines.append(name.ljust(w) + "| " + fmt(a) + "  | " + fmt(b))
    if "alignment_accuracy" in report:
        lines.append(
            f"alignment accuracy (top-1 within story, image->sentence): {100 * report['alignment_accuracy']:.1f}%"
        )
    if ceilings:
        lines.append(
            "ceilings (Bayes-optimal PMR of the synthetic split): "
            f"images alone {100 * ceilings['image']:.1f}, sentences alone {100 * ceilings['text']:.1f}, "
            f"item-level fusion {100 * ceilings['fused']:.1f}"
        )
    return "\n".join(lines)
