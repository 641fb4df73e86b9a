"""HTML reports for ``iterwego order --html`` and for evaluation runs.

Both reports are meant to be opened straight from disk, mailed or attached to
a ticket, so they never reference anything on the network: CSS is inline,
there are no scripts or fonts, and photos are embedded as small base64 JPEG
thumbnails. The evaluation report's plots are the one exception to "one
file": they are PNGs in a sibling ``<stem>_files/`` folder, linked relatively,
because matplotlib is an optional extra (``iterwego[report]``) and the page
must still render, saying why, when it is missing.

Every piece of user text (story ids, sentences, file names, notes) goes
through :func:`html.escape`. Files are written atomically (temporary file in
the target folder, then :func:`os.replace`), so a crash never leaves half a
report behind.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..data.readers import Story
from ..decode import MAX_EXACT
from ..errors import ImageError
from ..images import load_image
from ..result import Variant, orders_key
from ..tables import FUSED_LABELS, capture_time_line, ceiling_share, metric_rows
from .order import SCHEMA_VERSION, capture_line, placed_tags

if TYPE_CHECKING:  # evaluate pulls in torch; the report only needs the attributes
    from ..training.evaluator import EvalResult

__all__ = ["order_report", "evaluation_report", "THUMB_PX", "PLOT_FILES"]

#: Longer side of the embedded thumbnails, in pixels.
THUMB_PX = 160
#: Plot files :func:`evaluation_report` may write into ``<stem>_files/`` (and removes when it cannot redraw them).
PLOT_FILES = ("metrics_per_round.png", "confidence_hist.png")
_SUPPORTED_SCHEMA = SCHEMA_VERSION  # the `order --json` schema this report reads
_INSTALL_HINT = "pip install 'iterwego[report]'"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1280px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:.4em 0}h2{font-size:1.15em;margin:0 0 .3em}h3{font-size:1em;margin:.8em 0 .3em}
.sub{color:#5a6372;margin:0 0 1em}
section.story,section.block{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;margin:14px 0}
.meta{color:#5a6372;font-size:.9em;margin:.2em 0}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px;margin:.5em 0;font-size:.92em}
.verdict{font-weight:600;margin:.4em 0}.verdict.ok{color:#17723a}.verdict.bad{color:#b3261e}
.strip{display:flex;align-items:flex-start;overflow-x:auto;padding:4px 0 8px}
.cell{flex:0 0 auto;width:172px;border:2px solid #dde1e7;border-radius:6px;padding:4px;background:#fafbfc}
.cell.ok{border-color:#2e9d55}.cell.bad{border-color:#d0453a}
.pos{font-size:.8em;color:#5a6372;margin-bottom:2px}
.thumb{display:block;max-width:160px;max-height:160px;margin:0 auto;border-radius:3px}
.thumb.missing{width:156px;height:100px;border:1px dashed #b3261e;color:#b3261e;font-size:.75em;\
overflow:hidden;padding:2px;word-break:break-all}
.sent{display:block;font-size:.86em;margin-top:4px;white-space:pre-wrap;overflow-wrap:anywhere}
.sent.ok{color:#17723a}.sent.bad{color:#b3261e}
.tag{font-size:.75em;color:#5a6372}
.step{flex:0 0 auto;align-self:center;width:46px;text-align:center;font-size:.8em;color:#5a6372;line-height:1.25}
.step .c{display:block;font-weight:600}
.hi{color:#17723a}.mid{color:#a86b00}.lo{color:#b3261e}
ol.sentlist{margin:.3em 0;padding-left:2em}ol.sentlist li{margin:.15em 0}
ol.sentlist li.ok{color:#17723a}ol.sentlist li.bad{color:#b3261e}
ol.sentlist .sent{display:inline}
ol.sentlist .step{display:inline;margin-left:.6em}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #dde1e7;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
td.order{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace}
tr.chosen td{background:#eef5ff;font-weight:600}
figure.plot{margin:8px 0}figure.plot img{max-width:100%;border:1px solid #dde1e7;border-radius:4px;background:#fff}
figcaption{font-size:.85em;color:#5a6372}
.ok-mark{color:#17723a}.bad-mark{color:#b3261e}
"""


# ----------------------------------------------------------------- small helpers
def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _write_atomic(path: Path, data: bytes) -> None:
    from ..io import atomic_write_bytes  # one home for atomic writes

    atomic_write_bytes(path, data)


def _page(title: str, body: str) -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    ).encode("utf-8")


def _is_identity(order: Sequence[int]) -> bool:
    return list(order) == list(range(len(order)))


def _fmt_order(order: Sequence[int]) -> str:
    """1-based item numbers, as people count them."""
    return " ".join(str(int(k) + 1) for k in order)


def _conf_class(c: float) -> str:
    return "hi" if c >= 0.8 else "mid" if c >= 0.5 else "lo"


def _fmt_metric(m: dict | None) -> list[str]:
    """Acc / PMR in percent and tau, formatted exactly as
    :func:`iterwego.tables.format_table` prints them."""
    if m is None:
        return ["-", "-", "-"]
    tau = m["tau"]
    return [
        f"{100 * m['acc']:.1f}",
        f"{100 * m['pmr']:.1f}",
        "n/a" if isinstance(tau, float) and math.isnan(tau) else f"{tau:+.3f}",
    ]


class _Thumbs:
    """Embedded thumbnails, decoded once per image path per report."""

    def __init__(self, px: int = THUMB_PX):
        self.px = px
        self._cache: dict[str, tuple[str | None, str | None]] = {}

    def _make(self, path: str) -> tuple[str | None, str | None]:
        try:
            im = load_image(path)
        except ImageError as err:  # a report is a view: show what is wrong instead of refusing to render
            return None, str(err)
        im.thumbnail((self.px, self.px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None

    def img(self, path: str, cls: str = "") -> str:
        if path not in self._cache:
            self._cache[path] = self._make(path)
        uri, err = self._cache[path]
        name = Path(path).name
        if uri is None:
            return f'<div class="thumb missing {cls}" title="{_esc(path)}">{_esc(err)}</div>'
        return f'<img class="thumb {cls}" src="{uri}" alt="{_esc(name)}" title="{_esc(name)}">'


def _step(confs: Sequence[tuple[str, float]]) -> str:
    """The arrow between two neighbours, with P(left before right) for each labelled source."""
    inner = "".join(f'<span class="c {_conf_class(c)}">{_esc(lab)}{c:.2f}</span>' for lab, c in confs)
    return f'<div class="step" title="probability that the left item comes before the right one">&#8594;{inner}</div>'


def _cell(
    thumbs: _Thumbs,
    *,
    label: str,
    image: str | None,
    sentence: str | None,
    cls: str = "",
    image_cls: str = "",
    sentence_cls: str = "",
    tag: str = "",
) -> str:
    parts = [f'<div class="cell {cls}">', f'<div class="pos">{_esc(label)}</div>']
    if image is not None:
        parts.append(thumbs.img(image, image_cls))
    if sentence is not None:
        parts.append(f'<span class="sent {sentence_cls}">{_esc(sentence)}</span>')
    if tag:
        parts.append(f'<span class="tag">{_esc(tag)}</span>')
    parts.append("</div>")
    return "".join(parts)


def _strip(kind: str, cells: list[str], steps: list[str] | None = None) -> str:
    out = [f'<div class="strip" data-kind="{_esc(kind)}">']
    for k, c in enumerate(cells):
        if k and steps is not None:
            out.append(steps[k - 1] if k - 1 < len(steps) else _step([]))
        out.append(c)
    out.append("</div>")
    return "".join(out)


def _sentence_list(
    kind: str, sentences: Sequence[str], conf: Sequence[float] | None = None, marks: Sequence[bool] | None = None
) -> str:
    out = [f'<ol class="sentlist" data-kind="{_esc(kind)}">']
    for k, s in enumerate(sentences):
        cls = "" if marks is None else ("ok" if marks[k] else "bad")
        step = ""
        if conf is not None and k < len(conf):
            step = (
                '<span class="step" title="probability that this sentence comes before the next">&#8595; '
                f'<span class="c {_conf_class(conf[k])}">{conf[k]:.2f}</span></span>'
            )
        out.append(f'<li class="{cls}"><span class="sent">{_esc(s)}</span>{step}</li>')
    out.append("</ol>")
    return "".join(out)


def _mark(ok: bool) -> str:
    return '<span class="ok-mark">&#10003;</span>' if ok else '<span class="bad-mark">&#10007;</span>'


def _orders_table(rows: list[tuple[str, Sequence[int] | None, Sequence[int] | None]], gold: bool) -> str:
    """Compact rows: one variant per row, its orders as 1-based input (or gold) item numbers."""
    out = [
        '<table class="orders"><thead><tr><th>variant</th><th>image order</th><th>sentence order</th></tr></thead>'
        "<tbody>"
    ]
    for name, io_, so in rows:
        cells = []
        for o in (io_, so):
            if o is None:
                cells.append('<td class="order">-</td>')
            else:
                cells.append(
                    f'<td class="order">{_esc(_fmt_order(o))}{" " + _mark(_is_identity(o)) if gold else ""}</td>'
                )
        out.append(f"<tr><td>{_esc(name)}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _story_score(order: Sequence[int]) -> str:
    """``k/n in place, tau x`` for one prediction against the identity (gold) order."""
    n = len(order)
    pos = np.asarray(order)
    in_place = int((pos == np.arange(n)).sum())
    if n < 2:
        return f"{in_place}/{n} in place"
    disc = int((np.triu(pos[:, None] > pos[None, :], k=1)).sum())
    return f"{in_place}/{n} in place, tau {1 - 4 * disc / (n * (n - 1)):+.2f}"


# ----------------------------------------------------------------- order report
def _story_head(r: dict) -> list[str]:
    """The story's title, counts, note, capture-time line and what was not ordered."""
    v, mode = r.get("variants", {}), r.get("mode", "unimodal")
    imgs, sents = r.get("images") or [], r.get("sentences") or []
    counts = ", ".join(
        x for x in (f"{len(imgs)} images" if imgs else "", f"{len(sents)} sentences" if sents else "") if x
    )
    parts = [
        f'<section class="story" data-story="{_esc(r["id"])}">',
        f"<h2>Story {_esc(r['id'])}</h2>",
        f'<p class="meta">{_esc(counts)}; '
        f"{'one fused order of images and sentences' if mode == 'fused' else 'each modality ordered alone'}</p>",
    ]
    if r.get("note"):
        parts.append(f'<p class="note">{_esc(r["note"])}</p>')
    if r.get("capture_time"):
        parts.append(f'<p class="meta" data-key="capture-time">{_esc(capture_line(r))}</p>')
    if imgs and Variant.IMAGE_ONLY.value not in v and mode != "fused":
        parts.append('<p class="note">the images were not ordered: this run has no image orderer</p>')
    if sents and Variant.TEXT_ONLY.value not in v and mode != "fused":
        parts.append('<p class="note">the sentences were not ordered: this run has no sentence orderer</p>')
    return parts


def _headline_orders(r: dict) -> list[tuple[str, list[int]]]:
    """The headline prediction: the fused order when both modalities were aligned, else each modality alone."""
    if r.get("mode") == "fused":
        return [("images", list(r["image_order"])), ("sentences", list(r["sentence_order"]))]
    v = r.get("variants", {})
    keys = (("images", Variant.IMAGE_ONLY.value), ("sentences", Variant.TEXT_ONLY.value))
    return [(name, list(v[k]["order"])) for name, k in keys if k in v]


def _verdict(predicted: list[tuple[str, list[int]]]) -> str:
    exact = all(_is_identity(o) for _, o in predicted)
    detail = "; ".join(f"{name}: {_story_score(o)}" for name, o in predicted)
    verdict = "exactly right" if exact else "not exactly right"
    return (
        f'<p class="verdict {"ok" if exact else "bad"}" data-exact="{str(exact).lower()}">'
        f"{_mark(exact)} prediction {verdict} ({_esc(detail)})</p>"
    )


def _predicted_html(r: dict, thumbs: _Thumbs, gold: bool) -> list[str]:
    """The predicted order as an image strip (paired sentences under the images) or a sentence list."""
    v, imgs, sents, placed = r.get("variants", {}), r.get("images") or [], r.get("sentences") or [], placed_tags(r)

    def strip(order, conf, sentence_of=None) -> str:
        cells = [
            _cell(
                thumbs,
                label=f"{j + 1}. (input {i + 1})",
                image=imgs[i],
                sentence=None if sentence_of is None else sents[sentence_of[j]],
                cls=("ok" if i == j and (sentence_of is None or sentence_of[j] == j) else "bad") if gold else "",
                tag=placed[i],
            )
            for j, i in enumerate(order)
        ]
        return _strip("predicted", cells, [_step([("", c)]) for c in conf])

    if r.get("mode") == "fused":
        return [strip(r["image_order"], v[Variant.FUSED.value]["confidence"], r["sentence_order"])]
    out = []
    if Variant.IMAGE_ONLY.value in v:
        out.append(strip(v[Variant.IMAGE_ONLY.value]["order"], v[Variant.IMAGE_ONLY.value]["confidence"]))
    if Variant.TEXT_ONLY.value in v:
        o, conf = v[Variant.TEXT_ONLY.value]["order"], v[Variant.TEXT_ONLY.value]["confidence"]
        marks = [i == j for j, i in enumerate(o)] if gold else None
        out.append(_sentence_list("predicted-sentences", [sents[i] for i in o], conf, marks))
    return out


def _variant_rows(v: dict) -> list[tuple[str, Sequence[int] | None, Sequence[int] | None]]:
    """One row per variant: (name, image order, sentence order)."""
    rows: list[tuple[str, Sequence[int] | None, Sequence[int] | None]] = []
    img, txt = v.get(Variant.IMAGE_ONLY.value), v.get(Variant.TEXT_ONLY.value)
    if img or txt:
        rows.append(("single modality", (img or {}).get("order"), (txt or {}).get("order")))
    if Variant.GUIDED.value in v:
        g = v[Variant.GUIDED.value]
        name = f"guided (rounds: images {g['rounds']['image']}, sentences {g['rounds']['text']})"
        rows.append((name, g["image_order"], g["sentence_order"]))
    if Variant.FUSED.value in v:
        f = v[Variant.FUSED.value]
        rows.append(("fused", f["image_order"], f["sentence_order"]))
    return rows


def _pairing_line(r: dict, gold: bool) -> str:
    scores = r.get("pairing_score") or [None] * len(r["pairing"])
    pairs = ", ".join(
        f"{i + 1}&#8596;{t + 1}" + (f" ({s:.2f})" if s is not None else "") for (i, t), s in zip(r["pairing"], scores)
    )
    extra = ""
    if gold:
        right = sum(int(i == t) for i, t in r["pairing"])
        extra = f"; {right}/{len(r['pairing'])} pairs right"
    return f'<p class="meta">pairing (image&#8596;sentence, alignment score): {pairs}{extra}</p>'


def _gold_html(imgs: list, sents: list, thumbs: _Thumbs) -> list[str]:
    out = ["<h3>Gold order (as listed)</h3>"]
    if imgs:
        both = len(imgs) == len(sents)
        cells = [
            _cell(thumbs, label=f"{k + 1}.", image=p, sentence=sents[k] if both else None) for k, p in enumerate(imgs)
        ]
        out.append(_strip("gold", cells))
        if sents and not both:
            out.append(_sentence_list("gold-sentences", sents))
    elif sents:
        out.append(_sentence_list("gold-sentences", sents))
    return out


def _order_story(r: dict, thumbs: _Thumbs, gold: bool) -> str:
    parts = _story_head(r)
    predicted = _headline_orders(r)
    if gold and predicted:
        parts.append(_verdict(predicted))
    parts.append("<h3>Predicted order</h3>")
    parts += _predicted_html(r, thumbs, gold)
    rows = _variant_rows(r.get("variants", {}))
    if rows:
        parts.append("<h3>All variants</h3>")
        parts.append('<p class="meta">numbers are the items\' positions in the input listing (1 = first listed)</p>')
        parts.append(_orders_table(rows, gold))
    if r.get("pairing"):
        parts.append(_pairing_line(r, gold))
    if gold:
        parts += _gold_html(list(r.get("images") or []), list(r.get("sentences") or []), thumbs)
    parts.append("</section>")
    return "\n".join(parts)


def order_report(
    stories: Sequence[Story], results: Sequence[dict], path: str | os.PathLike, *, gold: bool = False
) -> Path:
    """Write a self-contained HTML page showing :func:`iterwego.apps.order.order_stories` results.

    Per story: the predicted order as an image strip (fused order when images
    and sentences were aligned, else the image-only order) with the paired
    sentence under each image and P(left before right) on each arrow, or the
    sentence list when there are no images; the single-modality, guided and
    fused orders as compact rows; the pairing; the note, if any. With
    ``gold=True`` (the listed input order *is* the gold order) also the gold
    strip and whether the prediction is exactly right.

    Images are embedded as base64 JPEG thumbnails (longer side ``THUMB_PX``);
    an unreadable image is shown as a box with the reason instead of failing.

    Raises:
        ValueError: ``stories`` and ``results`` differ in length or ids, or a
            result has an unknown schema version.
    """
    stories, results = list(stories), list(results)
    if stories and len(stories) != len(results):
        raise ValueError(f"got {len(stories)} stories but {len(results)} results")
    for k, r in enumerate(results):
        if r.get("schema") != _SUPPORTED_SCHEMA:
            raise ValueError(
                f"result {k} (story {r.get('id')!r}) has schema {r.get('schema')!r}; "
                f"this report reads schema {_SUPPORTED_SCHEMA}"
            )
        if stories and str(stories[k].id) != str(r["id"]):
            raise ValueError(f"result {k} is for story {r['id']!r} but story {k} is {stories[k].id!r}")
    out = Path(path)
    thumbs = _Thumbs()
    body = ["<h1>IterWeGO: recovered story order</h1>"]
    n_exact = None
    if gold:
        n_exact = 0
        for r in results:
            orders = [o for _, o in _headline_orders(r)]
            n_exact += bool(orders) and all(_is_identity(o) for o in orders)
    summary = f"{len(results)} {'story' if len(results) == 1 else 'stories'}"
    if n_exact is not None:
        summary += f"; {n_exact} exactly right against the listed (gold) order"
    body.append(
        f'<p class="sub">{_esc(summary)}. '
        "Arrows show the model's probability that the left item comes before the right one.</p>"
    )
    for r in results:
        body.append(_order_story(r, thumbs, gold))
    _write_atomic(out, _page("IterWeGO order report", "\n".join(body)))
    return out


# ----------------------------------------------------------------- evaluation report
def _metric_table(report: dict, ceilings: dict | None, fused_text: dict | None) -> str:
    share_head = (
        ('<th colspan="2">PMR / ceiling</th>', "<th>images %</th><th>sentences %</th>") if ceilings else ("", "")
    )
    out = [
        '<table class="metrics"><thead>',
        '<tr><th rowspan="2">variant</th><th colspan="3">images</th><th colspan="3">sentences</th>'
        f"{share_head[0]}</tr>",
        "<tr><th>Acc %</th><th>PMR %</th><th>&#964;</th><th>Acc %</th><th>PMR %</th><th>&#964;</th>"
        f"{share_head[1]}</tr>",
        "</thead><tbody>",
    ]
    for name, a, b, chosen in metric_rows(report, fused_text):
        shares = [ceiling_share(name, m, mod, ceilings) for m, mod in ((a, "image"), (b, "text"))] if ceilings else []
        extra = ["-" if v is None else f"{100 * v:.0f}" for v in shares]
        cells = "".join(f"<td>{_esc(x)}</td>" for x in _fmt_metric(a) + _fmt_metric(b) + extra)
        tr = '<tr class="chosen">' if chosen else "<tr>"
        out.append(f"{tr}<td>{_esc(name)}</td>{cells}</tr>")
    out.append("</tbody></table>")
    if "alignment_accuracy" in report:
        out.append(
            '<p class="meta" data-key="alignment">alignment accuracy (top-1 within story, image&#8594;sentence): '
            f"{100 * report['alignment_accuracy']:.1f}%</p>"
        )
    if capture_time_line(report):
        out.append(f'<p class="meta" data-key="capture-time">{_esc(capture_time_line(report))}</p>')
    if ceilings:
        names = {"image": "images alone", "text": "sentences alone", "fused": "item-level fusion"}
        vals = ", ".join(f"{_esc(names.get(k, k))} {100 * float(v):.1f}" for k, v in ceilings.items())
        out.append(
            f'<p class="meta" data-key="ceilings">ceilings (Bayes-optimal PMR of the synthetic split, %): {vals}</p>'
        )
    return "\n".join(out)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_rounds(Figure, report: dict, fused_text: dict | None) -> bytes | None:
    mods = [
        (m, lab, col)
        for m, lab, col in (("image", "images", "#1f6fb4"), ("text", "sentences", "#d9730d"))
        if m in report
    ]
    if not mods:
        return None
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    fused_for = {"image": report.get("fused"), "text": fused_text or report.get("fused_text") or report.get("fused")}
    fused_label = FUSED_LABELS[report.get("fusion", "sum")]
    for ax, key, ylab, scale in ((axes[0], "pmr", "PMR (%)", 100.0), (axes[1], "tau", "Kendall tau", 1.0)):
        for m, lab, col in mods:
            rs = report[m]["rounds"]
            x = np.arange(len(rs))
            y = np.array([scale * float(d[key]) for d in rs])
            ax.plot(x, y, "-o", color=col, label=lab, ms=4)
            c = report[m]["chosen_round"]
            ax.plot(
                [c],
                [y[c]],
                marker="*",
                ms=15,
                color=col,
                markeredgecolor="k",
                linestyle="none",
                label=f"{lab}: val-chosen round {c}",
            )
            f = fused_for[m]
            if f is not None and key in f:
                ax.axhline(scale * float(f[key]), color=col, ls=":", lw=1.2, label=f"{lab}: {fused_label}")
        ax.set_xlabel("guidance round (0 = unimodal)")
        ax.set_ylabel(ylab)
        n = max(len(report[m]["rounds"]) for m, _, _ in mods)
        ax.set_xticks(range(n))
        ax.grid(alpha=0.3)
    axes[0].set_title("perfect match ratio per round")
    axes[1].set_title("Kendall tau per round")
    handles, labels = axes[0].get_legend_handles_labels()
    # below the axes: inside them the legend hides the curves it explains
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return _png_bytes(fig)


def _plot_confidences(Figure, confidences: dict[str, list[list[float]]]) -> bytes | None:
    mods = [
        (m, lab, col)
        for m, lab, col in (("image", "images", "#1f6fb4"), ("text", "sentences", "#d9730d"))
        if any(len(s) for s in confidences.get(m, []))
    ]
    if not mods:
        return None
    fig = Figure(figsize=(5 * len(mods), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(mods)))
    bins = np.linspace(0.0, 1.0, 21)
    for ax, (m, lab, col) in zip(axes, mods):
        vals = np.concatenate([np.asarray(s, dtype=float) for s in confidences[m] if len(s)])
        ax.hist(vals, bins=bins, color=col, alpha=0.85, edgecolor="white")
        ax.axvline(0.5, color="k", lw=0.8, ls="--")
        ax.set_title(
            f"{lab}: mean {vals.mean():.2f}, {100 * (vals > 0.5).mean():.0f}% > 0.5 (n={vals.size})", fontsize=9
        )
        ax.set_xlabel("P(gold item k before k+1), round 0")
        ax.set_ylabel("adjacent gold pairs")
        ax.set_xlim(0, 1)
    fig.tight_layout()
    return _png_bytes(fig)


def _write_plots(
    files_dir: Path, report: dict, result: "EvalResult", fused_text: dict | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the plots; returns ([(file name, caption)], notes). Stale plot files from earlier runs are removed."""
    notes: list[str] = []
    written: list[tuple[str, str]] = []
    try:
        from matplotlib.figure import Figure  # the OO API: no pyplot global state, no display backend needed
    except ImportError as err:
        Figure = None
        notes.append(
            f"Plots skipped: matplotlib is not installed ({err}). Install the optional extra with {_INSTALL_HINT}."
        )
    if Figure is not None:
        plots = (
            (
                PLOT_FILES[0],
                "PMR and Kendall tau per guidance round (stars: round chosen on validation; "
                f"dotted: {FUSED_LABELS[report.get('fusion', 'sum')]}).",
                lambda: _plot_rounds(Figure, report, fused_text),
                "no per-round metrics in the report",
            ),
            (
                PLOT_FILES[1],
                "Confidence on adjacent gold pairs, round 0: "
                "how sure each orderer is that gold item k comes before k+1.",
                lambda: _plot_confidences(Figure, result.confidences),
                "no confidences recorded (evaluate with keep_orders=True)",
            ),
        )
        for name, caption, draw, why_not in plots:
            data = draw()
            if data is None:
                notes.append(f"Plot {name} skipped: {why_not}.")
                continue
            _write_atomic(files_dir / name, data)
            written.append((name, caption))
    keep = {n for n, _ in written}
    for name in PLOT_FILES:  # a plot we could not redraw must not survive from an earlier report
        if name not in keep:
            try:
                (files_dir / name).unlink()
            except FileNotFoundError:
                pass
    if files_dir.is_dir() and not any(files_dir.iterdir()):
        files_dir.rmdir()
    return written, notes


def _sample_gold(thumbs: _Thumbs, story: Story, conf: dict[str, list[float]]) -> list[str]:
    """The gold order, with each orderer's round-0 P(gold item k before k+1) on the steps."""
    n = len(story)
    out = ["<h3>Gold order</h3>"]
    if story.has_images:
        both = [m for m in ("image", "text") if conf[m]]
        label = lambda m: ("img " if m == "image" else "txt ") if len(both) > 1 else ""  # noqa: E731
        steps = [_step([(label(m), conf[m][k]) for m in both if k < len(conf[m])]) for k in range(n - 1)]
        cells = [
            _cell(thumbs, label=f"{k + 1}.", image=it.image, sentence=it.sentence) for k, it in enumerate(story.items)
        ]
        out.append(_strip("gold", cells, steps))
    elif story.has_sentences:
        out.append(_sentence_list("gold-sentences", story.sentences, conf["text"] or None))
    return out


def _sample_predicted(thumbs: _Thumbs, story: Story, io_: list[int] | None, so: list[int] | None) -> list[str]:
    """The guided prediction (gold positions), as an image strip with the sentences or a sentence list."""
    out = ["<h3>Predicted order (guided, val-chosen round)</h3>"]
    if story.has_images and io_ is not None:
        cells = []
        for j, gi in enumerate(io_):
            s = story.items[so[j]].sentence if so is not None and story.has_sentences else None
            cells.append(
                _cell(
                    thumbs,
                    label=f"{j + 1}. (gold {gi + 1})",
                    image=story.items[gi].image,
                    sentence=s,
                    cls="ok" if gi == j else "bad",
                    sentence_cls=("ok" if so[j] == j else "bad") if s is not None else "",
                    tag=f"sentence: gold {so[j] + 1}" if s is not None else "",
                )
            )
        out.append(_strip("predicted", cells))
    elif story.has_sentences and so is not None:
        sents = [story.items[t].sentence for t in so]
        out.append(_sentence_list("predicted-sentences", sents, None, [t == j for j, t in enumerate(so)]))
    return out


def _sample_card(thumbs: _Thumbs, story: Story, i: int, result: "EvalResult", keys: dict[str, str], exact: bool) -> str:
    n = len(story)
    pred = {m: list(result.orders[k][i]) for m, k in keys.items()}
    for m, o in pred.items():
        if sorted(o) != list(range(n)):
            raise ValueError(
                f"story {story.id!r}: prediction {m} {o} is not a permutation of its {n} items "
                "(were the stories passed in evaluation order?)"
            )
    detail = "; ".join(f"{'images' if m == 'image' else 'sentences'}: {_story_score(o)}" for m, o in pred.items())
    parts = [
        f'<section class="story sample" data-story="{_esc(story.id)}" data-exact="{str(exact).lower()}">',
        f"<h2>Story {_esc(story.id)}</h2>",
        f'<p class="verdict {"ok" if exact else "bad"}">{_mark(exact)} guided prediction '
        f"{'exactly right' if exact else 'not exactly right'} ({_esc(detail)})</p>",
    ]
    conf = {m: result.confidences.get(m, []) for m in ("image", "text")}
    parts += _sample_gold(thumbs, story, {m: (c[i] if i < len(c) else []) for m, c in conf.items()})
    io_, so = pred.get("image"), pred.get("text")
    parts += _sample_predicted(thumbs, story, io_, so)
    uni = {m: result.orders.get(orders_key(m, 0)) for m in ("image", "text")}
    rows: list[tuple[str, Sequence[int] | None, Sequence[int] | None]] = [
        ("unimodal (round 0)", uni["image"][i] if uni["image"] else None, uni["text"][i] if uni["text"] else None),
        ("guided (val-chosen)", io_, so),
    ]
    fi, ft = result.orders.get(orders_key("image")), result.orders.get(orders_key("text"))
    if fi and ft:
        rows.append(("fused", fi[i], ft[i]))
    parts.append('<p class="meta">numbers are gold positions (1 = first in the gold story)</p>')
    parts.append(_orders_table(rows, gold=True))
    parts.append("</section>")
    return "\n".join(parts)


def _samples(
    report: dict, result: "EvalResult", stories: Sequence[Story], max_samples: int, seed: int
) -> tuple[str, str | None]:
    """HTML for a seeded sample of right and wrong stories, or a note why there is none."""
    keys = {m: orders_key(m, report[m]["chosen_round"]) for m in ("image", "text") if m in report}
    keys = {m: k for m, k in keys.items() if k in result.orders}
    if not keys:
        return (
            "",
            "No story samples: the evaluation kept no predicted orders (run the evaluator with keep_orders=True).",
        )
    if max_samples <= 0:
        return "", None
    by_id = {str(s.id): s for s in stories}
    eligible = [i for i, sid in enumerate(result.story_ids) if str(sid) in by_id]
    if not eligible:
        return "", "No story samples: none of the evaluated stories were passed to the report."
    exact = {i: all(_is_identity(result.orders[k][i]) for k in keys.values()) for i in eligible}
    right = [i for i in eligible if exact[i]]
    wrong = [i for i in eligible if not exact[i]]
    # half right, half wrong; whichever group is short leaves its share to the other
    n_wrong = min(len(wrong), max_samples - min(len(right), max_samples // 2))
    n_right = min(len(right), max_samples - n_wrong)
    rng = np.random.default_rng(seed)
    pick_w = sorted(rng.choice(wrong, n_wrong, replace=False).tolist()) if n_wrong else []
    pick_r = sorted(rng.choice(right, n_right, replace=False).tolist()) if n_right else []
    thumbs = _Thumbs()
    out = [
        f'<p class="sub">{len(pick_w)} of {len(wrong)} wrong and {len(pick_r)} of {len(right)} exactly right stories '
        f"(guided orders at the val-chosen round; seed {seed}).</p>"
    ]
    if pick_w:
        out.append("<h3>Wrong</h3>")
        out += [_sample_card(thumbs, by_id[str(result.story_ids[i])], i, result, keys, False) for i in pick_w]
    if pick_r:
        out.append("<h3>Right</h3>")
        out += [_sample_card(thumbs, by_id[str(result.story_ids[i])], i, result, keys, True) for i in pick_r]
    return "\n".join(out), None


def evaluation_report(
    path: str | os.PathLike,
    *,
    report: dict,
    result: "EvalResult",
    stories: Sequence[Story],
    title: str = "",
    ceilings: dict | None = None,
    fused_text: dict | None = None,
    max_samples: int = 12,
    seed: int = 0,
) -> Path:
    """Write an HTML evaluation report to ``path`` and its plots to ``<stem>_files/`` next to it.

    Contents: the metric table (the rows of :func:`iterwego.tables.format_table`:
    unimodal, each guidance round, the val-chosen guided row and fused
    decoding, Acc / PMR / tau per modality, alignment accuracy and ceilings if
    given); two plots (metrics per round with the chosen round starred, and
    histograms of round-0 adjacent-pair confidences per modality); and up to
    ``max_samples`` stories drawn with ``seed``, half exactly right and half
    wrong where possible, each showing the gold order and the guided
    prediction with embedded thumbnails and sentences.

    ``report`` is ``result.report(chosen)``; ``stories`` are the evaluated
    stories in gold order (matched to ``result.story_ids`` by id). Without
    matplotlib the page still renders, without plots, and says why. The page
    links only to the plot files it wrote; plot files it could not redraw
    are removed from ``<stem>_files/``.

    Raises:
        ValueError: a kept prediction is not a permutation of its story's items.
    """
    out = Path(path)
    files_dir = out.with_name(out.stem + "_files")
    title = title or "IterWeGO evaluation"
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{len(result.story_ids)} stories; guided rows use the round chosen on validation.</p>',
    ]
    body.append('<section class="block"><h2>Metrics</h2>')
    body.append(_metric_table(report, ceilings, fused_text))
    if getattr(result, "decoder_fallbacks", 0):
        body.append(
            f'<p class="meta">{result.decoder_fallbacks} story decode(s) longer than {MAX_EXACT} items '
            "used the beam decoder.</p>"
        )
    body.append("</section>")

    written, notes = _write_plots(files_dir, report, result, fused_text)
    body.append('<section class="block"><h2>Plots</h2>')
    for n in notes:
        body.append(f'<p class="note">{_esc(n)}</p>')
    rel = urllib.parse.quote(files_dir.name)
    for name, caption in written:
        body.append(
            f'<figure class="plot"><img src="{rel}/{urllib.parse.quote(name)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    body.append("</section>")

    samples, why = _samples(report, result, stories, max_samples, seed)
    body.append('<section class="block"><h2>Sample stories</h2>')
    if why:
        body.append(f'<p class="note">{_esc(why)}</p>')
    body.append(samples)
    body.append("</section>")
    _write_atomic(out, _page(title, "\n".join(body)))
    return out
