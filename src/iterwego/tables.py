"""The one presentation module: the text table ``iterwego evaluate`` and the demo print, and the rows every other
table (the HTML report, the model card) shows, all read from one metrics JSON (:meth:`EvalResult.report`)."""

from __future__ import annotations

#: The fused row's label per ``fusion.method``; "fused decoding" is 0.1/0.2's sum of pair log-odds.
FUSED_LABELS = {"sum": "fused decoding", "orderer": "fused orderer"}


def ceiling_of(name: str, modality: str, ceilings: dict | None = None) -> str:
    """Which ceiling a table row is measured against: its own modality's for the unimodal row, else the
    item-level fusion ceiling (guided and fused orders use both modalities), or, on data with narrating
    sentences, that modality's tighter bound (``fused_image`` / ``fused_text``)."""
    if name.startswith("unimodal"):
        return modality
    return f"fused_{modality}" if f"fused_{modality}" in (ceilings or {}) else "fused"


def ceiling_share(name: str, m: dict | None, modality: str, ceilings: dict | None) -> float | None:
    """A table row's PMR over its ceiling (:func:`ceiling_of`); None without a ceiling or metrics, and for rows
    with capture times, which use information the ceilings do not count."""
    c = (ceilings or {}).get(ceiling_of(name, modality, ceilings))
    return None if m is None or not c or "capture times" in name else m["pmr"] / c


def metric_rows(report: dict, fused_text: dict | None = None) -> list[tuple[str, dict | None, dict | None, bool]]:
    """The rows of every metric table (text and HTML): (variant, image metrics, text metrics, val-chosen row?).

    ``fused_text``: the fused order's sentence metrics, for reports saved before they held ``fused_text``.
    """
    img, txt = report.get("image"), report.get("text")
    fused_text = fused_text or report.get("fused_text")
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
        if "fused_text" in ceilings:
            lines.append(
                "with narrating sentences, rows using both modalities are measured against tighter upper bounds: "
                f"images {100 * ceilings['fused_image']:.1f}, sentences {100 * ceilings['fused_text']:.1f} "
                "(docs/synthetic.md)"
            )
    return "\n".join(lines)


def format_side_by_side(reports: dict[str, dict], title: str = "") -> str:
    """PMR of images and sentences per variant (unimodal, guided, fused) for several reports side by side, one
    column pair per report (e.g. the demo's test split as synthesised and again with narrating sentences), and
    each report's alignment accuracy."""
    per = {k: {n: (a, b) for n, a, b, _ in metric_rows(r)} for k, r in reports.items()}
    first = next(iter(per.values()))
    names = [n for n in first if not n.startswith("round ") and "capture times" not in n]
    w = max(len(n) for n in [*names, "alignment accuracy"]) + 2
    cw = max(14, *(len(k) + 2 for k in reports))

    def pmr(m: dict | None) -> str:
        return "  -  " if m is None else f"{100 * m['pmr']:5.1f}"

    def align(r: dict) -> str:
        return f"{100 * r['alignment_accuracy']:.1f}%" if "alignment_accuracy" in r else "-"

    lines = [title] if title else []
    lines.append(" " * w + "".join(f"| {k:<{cw}}" for k in reports))
    lines.append("PMR (%)".ljust(w) + "".join(f"| {'  img    txt':<{cw}}" for _ in reports))
    lines.append("-" * w + ("+" + "-" * (cw + 1)) * len(reports))
    for n in names:
        cells = [pmr(per[k].get(n, (None, None))[0]) + "  " + pmr(per[k].get(n, (None, None))[1]) for k in reports]
        lines.append(n.ljust(w) + "".join(f"| {c:<{cw}}" for c in cells))
    lines.append("alignment accuracy".ljust(w) + "".join(f"| {align(r):<{cw}}" for r in reports.values()))
    return "\n".join(line.rstrip() for line in lines)


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


def metrics_json(report: dict, ceilings: dict | None = None) -> dict:
    """The metrics JSON ``evaluate --json`` and the demo write: the report, and with ``ceilings`` (synthetic
    data) the ceilings and each fused order's PMR as a share of the item-level fusion ceiling, per modality."""
    if not ceilings:
        return report
    out = {**report, "ceilings": ceilings}
    if "fused" in report:
        label = FUSED_LABELS[report.get("fusion", "sum")]
        fused = {"image": report["fused"], "text": report.get("fused_text")}
        out["fused_ceiling_share"] = {m: ceiling_share(label, f, m, ceilings) for m, f in fused.items()}
    return out
