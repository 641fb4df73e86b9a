"""Behaviour of iterwego.report: self-contained HTML for `order --html` and evaluation reports."""

from __future__ import annotations

import base64
import builtins
import io
import os
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from iterwego.apps.report import PLOT_FILES, THUMB_PX, evaluation_report, order_report
from iterwego.data.readers import Item, Story
from iterwego.tables import format_table
from iterwego.training.evaluator import EvalResult

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# sentences with markup, quotes and ampersands: they must come out as text, never as tags
SENTS = ['Mum said "hi" & <b>waved</b>', "Then <script>alert(1)</script> we ate", "We went home at 5 > 4 o'clock"]


# ------------------------------------------------------------------ a strict little HTML checker
@dataclass
class El:
    tag: str
    attrs: dict
    text: str
    ancestors: list = field(default_factory=list)  # (tag, attrs) from the root down

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def within(self, key: str, value: str | None = None) -> bool:
        return any(key in a and (value is None or a[key] == value) for _, a in self.ancestors)

    def anc(self, key: str) -> str | None:
        for _, a in reversed(self.ancestors):
            if key in a:
                return a[key]
        return None


class Checker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, dict, list[str]]] = []
        self.done: list[El] = []
        self.errors: list[str] = []
        self.refs: list[str] = []
        self.count: dict[str, int] = {}

    def _start(self, tag, attrs, void):
        a = {k: (v or "") for k, v in attrs}
        self.refs += [a[k] for k in ("src", "href") if k in a]
        self.count[tag] = self.count.get(tag, 0) + 1
        if void:
            self.done.append(El(tag, a, "", [(t, x) for t, x, _ in self.open]))
        else:
            self.open.append((tag, a, []))

    def handle_starttag(self, tag, attrs):
        self._start(tag, attrs, tag in VOID)

    def handle_startendtag(self, tag, attrs):
        self._start(tag, attrs, True)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.open or self.open[-1][0] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1][0] if self.open else None}>")
            return
        t, a, buf = self.open.pop()
        self.done.append(El(t, a, "".join(buf), [(x, y) for x, y, _ in self.open]))

    def handle_data(self, data):
        for _, _, buf in self.open:
            buf.append(data)

    def find(self, cls: str | None = None, tag: str | None = None) -> list[El]:
        # self.done is in closing order; sort back into document order is not needed for leaves of one kind
        return [e for e in self.done if (cls is None or cls in e.classes()) and (tag is None or e.tag == tag)]


def check_html(path: Path) -> Checker:
    """Parse and enforce what every report promises: balanced tags, no network, only its own files."""
    raw = path.read_text(encoding="utf-8")
    c = Checker()
    c.feed(raw)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.open, f"unclosed tags: {[t for t, _, _ in c.open]}"
    for tag in ("html", "head", "body", "main", "title", "style"):
        assert c.count.get(tag) == 1, tag
    assert c.count.get("script", 0) == 0 and c.count.get("link", 0) == 0
    low = raw.lower()
    assert "http://" not in low and "https://" not in low
    assert "url(" not in low and "@import" not in low and "@font-face" not in low
    files_dir = path.with_name(path.stem + "_files").resolve()
    for ref in c.refs:
        if ref.startswith("data:"):
            continue
        assert "://" not in ref and not ref.startswith(("/", "//")), ref
        target = (path.parent / urllib.parse.unquote(ref)).resolve()
        assert target.is_relative_to(files_dir) and target.is_file(), ref
    return c


def sentences_in(c: Checker, kind: str, story: str) -> list[str]:
    """Texts of the sentence elements inside one strip/list (document order) of one story."""
    out = []
    for e in c.done:
        if "sent" in e.classes() and e.anc("data-kind") == kind and e.anc("data-story") == story:
            out.append(e.text)
    return out


def decode_data_uri(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


# ------------------------------------------------------------------ fake inputs
def make_images(d: Path, n: int, big: bool = False) -> list[str]:
    colours = [(220, 40, 40), (40, 160, 60), (40, 60, 220), (230, 200, 30), (120, 40, 160)]
    out = []
    for k in range(n):
        p = d / f"img{k}.png"
        Image.new("RGB", (640, 400) if big and k == 0 else (48, 32), colours[k % len(colours)]).save(p)
        out.append(str(p))
    return out


def fused_result(sid: str, imgs: list[str], sents: list[str], order: list[int], conf: list[float]) -> dict:
    """Shaped like iterwego.inference.order_stories output for an aligned story (pairing = listed pairs)."""
    n = len(imgs)
    return {
        "schema": 1,
        "id": sid,
        "images": imgs,
        "sentences": sents,
        "variants": {
            "image_only": {"order": list(range(n))[::-1], "confidence": [0.6] * (n - 1)},
            "text_only": {"order": list(range(n)), "confidence": [0.7] * (n - 1)},
            "guided": {
                "image_order": order,
                "sentence_order": order,
                "rounds": {"image": 1, "text": 2},
                "image_confidence": conf,
                "sentence_confidence": conf,
            },
            "fused": {"image_order": order, "sentence_order": order, "confidence": conf},
        },
        "pairing": [[k, k] for k in range(n)],
        "pairing_score": [0.87] * n,
        "image_order": order,
        "sentence_order": order,
        "mode": "fused",
    }


def text_result(sid: str, sents: list[str], order: list[int], conf: list[float]) -> dict:
    return {
        "schema": 1,
        "id": sid,
        "images": [],
        "sentences": sents,
        "variants": {"text_only": {"order": order, "confidence": conf}},
        "sentence_order": order,
        "mode": "unimodal",
    }


# ------------------------------------------------------------------ order_report
def test_order_report_gold_shows_prediction_gold_and_verdict(tmp_path):
    imgs_a = make_images(tmp_path, 3, big=True)
    (tmp_path / "b").mkdir()
    imgs_b = make_images(tmp_path / "b", 3)
    stories = [
        Story("A<1>", [Item(image=i, sentence=s) for i, s in zip(imgs_a, SENTS)]),
        Story("B", [Item(image=i, sentence=s) for i, s in zip(imgs_b, SENTS)]),
    ]
    results = [
        fused_result("A<1>", imgs_a, SENTS, [0, 1, 2], [0.97, 0.88]),
        fused_result("B", imgs_b, SENTS, [2, 0, 1], [0.93, 0.41]),
    ]
    out = order_report(stories, results, tmp_path / "rep" / "order.html", gold=True)
    assert out == tmp_path / "rep" / "order.html"
    c = check_html(out)
    raw = out.read_text(encoding="utf-8")

    # user text is escaped: the markup in sentences and ids is text, not tags
    assert "<script>" not in raw and "<b>waved" not in raw and 'data-story="A&lt;1&gt;"' in raw
    assert c.count.get("b", 0) == 0
    # predicted strip in predicted order, with the paired sentence under each image; gold strip in listed order
    assert sentences_in(c, "predicted", "B") == [SENTS[2], SENTS[0], SENTS[1]]
    assert sentences_in(c, "gold", "B") == SENTS
    assert sentences_in(c, "predicted", "A<1>") == SENTS
    # the confidence of each adjacent step sits on the arrows of the predicted strip, in order
    steps_b = [e.text for e in c.find("c") if e.anc("data-kind") == "predicted" and e.anc("data-story") == "B"]
    assert steps_b == ["0.93", "0.41"]
    # verdicts
    verdict = {e.anc("data-story"): e.attrs.get("data-exact") for e in c.find("verdict")}
    assert verdict == {"A<1>": "true", "B": "false"}
    assert "1 exactly right" in raw
    # the compact rows list every variant; orders are 1-based
    rows = [e.text for e in c.find(tag="tr") if e.anc("data-story") == "B"]
    assert any(r.startswith("fused") and "3 1 2" in r for r in rows)
    assert any(r.startswith("guided") and "rounds: images 1, sentences 2" in r for r in rows)
    assert any(r.startswith("single modality") and "3 2 1" in r and "1 2 3" in r for r in rows)
    # images are embedded, downscaled thumbnails
    srcs = [e.attrs["src"] for e in c.find(tag="img")]
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    sizes = [decode_data_uri(s).size for s in srcs]
    assert max(max(s) for s in sizes) == THUMB_PX  # the 640x400 picture
    assert (48, 32) in sizes  # small pictures are not blown up


def test_order_report_text_only_mismatched_and_no_gold(tmp_path):
    imgs = make_images(tmp_path, 2)
    note = "2 images but 3 sentences: each modality is ordered alone <odd & note>"
    mixed = {
        "schema": 1,
        "id": "mixed",
        "images": imgs,
        "sentences": SENTS,
        "note": note,
        "mode": "unimodal",
        "variants": {
            "image_only": {"order": [1, 0], "confidence": [0.55]},
            "text_only": {"order": [2, 1, 0], "confidence": [0.9, 0.2]},
        },
        "image_order": [1, 0],
        "sentence_order": [2, 1, 0],
    }
    results = [text_result("T", SENTS, [1, 0, 2], [0.66, 0.12]), mixed]
    out = order_report([], results, tmp_path / "o.html")
    c = check_html(out)
    raw = out.read_text(encoding="utf-8")
    assert sentences_in(c, "predicted-sentences", "T") == [SENTS[1], SENTS[0], SENTS[2]]
    assert [e.text for e in c.find("c") if e.anc("data-story") == "T"] == ["0.66", "0.12"]
    assert "&lt;odd &amp; note&gt;" in raw and [e.text for e in c.find("note")] == [note]
    # images alone: a strip without sentences; sentences alone: their own list
    assert sentences_in(c, "predicted", "mixed") == []
    assert len([e for e in c.find(tag="img") if e.anc("data-story") == "mixed"]) == 2
    assert sentences_in(c, "predicted-sentences", "mixed") == [SENTS[2], SENTS[1], SENTS[0]]
    # no gold was claimed: no gold strip, no verdict
    assert not c.find("verdict") and not any(e.anc("data-kind") in ("gold", "gold-sentences") for e in c.done)


def test_order_report_missing_image_is_shown_and_writes_atomically(tmp_path):
    imgs = make_images(tmp_path, 2) + [str(tmp_path / "gone.jpg")]
    res = fused_result("S", imgs, SENTS, [0, 2, 1], [0.5, 0.5])
    path = tmp_path / "out" / "r.html"
    path.parent.mkdir()
    path.write_text("old")
    order_report([Story("S", [Item(image=i, sentence=s) for i, s in zip(imgs, SENTS)])], [res], path, gold=True)
    c = check_html(path)
    missing = c.find("missing")
    assert missing and all("gone.jpg" in e.text and "not found" in e.text for e in missing)
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.html"]  # replaced in place, no temp files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600


def test_order_report_rejects_results_that_do_not_match(tmp_path):
    res = text_result("T", SENTS, [0, 1, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="schema"):
        order_report([], [dict(res, schema=99)], tmp_path / "x.html")
    with pytest.raises(ValueError, match="story"):
        order_report([Story("other", [Item(sentence=s) for s in SENTS])], [res], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters="\n\t"), max_size=40),
        min_size=2,
        max_size=4,
    )
)
def test_any_sentence_text_comes_back_verbatim(sentences):
    with tempfile.TemporaryDirectory() as d:
        n = len(sentences)
        out = order_report(
            [], [text_result("p", sentences, list(range(n))[::-1], [0.5] * (n - 1))], Path(d) / "p.html", gold=True
        )
        c = check_html(out)
        assert sentences_in(c, "predicted-sentences", "p") == sentences[::-1]
        assert sentences_in(c, "gold-sentences", "p") == sentences


# ------------------------------------------------------------------ evaluation_report
def metric(acc, pmr, tau):
    return {"acc": acc, "pmr": pmr, "tau": tau}


def eval_inputs(tmp_path: Path, n_stories: int = 6, n_right: int = 2):
    """An EvalResult by hand: 3-item stories; the first n_right are exactly right at the chosen rounds."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    pics = make_images(img_dir, 3)
    stories = [
        Story(f"s{k}", [Item(image=pics[j], sentence=f"story {k} step {j}: {SENTS[j]}") for j in range(3)])
        for k in range(n_stories)
    ]
    right, wrong = [0, 1, 2], [1, 0, 2]
    per_story = lambda ok: [right if k < n_right else wrong for k in range(n_stories)] if ok else [wrong] * n_stories  # noqa: E731
    orders = {}
    for m, chosen in (("image", 1), ("text", 2)):
        for r in range(3):
            orders[f"{m}/round{r}"] = per_story(r == chosen)
    orders["fused/image"] = orders["fused/text"] = [right] * n_stories
    res = EvalResult(
        rounds={
            "image": [metric(0.5, 0.2, 0.31), metric(0.61, 0.333, 0.42), metric(0.6, 0.3, 0.4)],
            "text": [metric(0.4, 0.1, 0.2), metric(0.45, 0.15, 0.25), metric(0.55, 0.25, 0.35)],
        },
        fused={**metric(0.7, 0.5, 0.6), "text": metric(0.68, 0.45, 0.58)},
        alignment_accuracy=0.875,
        orders=orders,
        confidences={"image": [[0.9, 0.2]] * n_stories, "text": [[0.7, 0.6]] * n_stories},
        story_ids=[s.id for s in stories],
    )
    return res, stories


def table_rows(c: Checker) -> list[list[str]]:
    rows = [e for e in c.done if e.tag == "tr" and e.within("class", "metrics")]
    cells = [e for e in c.done if e.tag in ("td", "th") and e.within("class", "metrics")]
    out = []
    for tr in rows:  # cells are closed before their row; group by their open <tr> (same attrs object)
        out.append([e.text for e in cells if any(a is tr.attrs for _, a in e.ancestors)])
    return out


def test_evaluation_report_table_plots_and_samples(tmp_path):
    pytest.importorskip("matplotlib")
    res, stories = eval_inputs(tmp_path)
    report = res.report({"image": 1, "text": 2})
    ceilings = {"image": 0.41, "text": 0.22, "fused": 0.83}
    out = evaluation_report(
        tmp_path / "rep" / "eval.html",
        report=report,
        result=res,
        stories=stories,
        title="test <split>",
        ceilings=ceilings,
        fused_text=res.fused["text"],
        max_samples=4,
        seed=3,
    )
    c = check_html(out)
    raw = out.read_text(encoding="utf-8")
    assert "test &lt;split&gt;" in raw

    # one row per variant, in percent, from the numbers eval_inputs put in (guided: the given rounds 1 and 2;
    # the fused row's sentence columns come from fused_text)
    got = [r for r in table_rows(c) if r and r[0] not in ("variant", "Acc %")]
    html_shares = [r[7:] for r in got]  # PMR over its ceiling: the unimodal row's own, the others' fusion
    got = [r[:7] for r in got]
    assert html_shares == [["49", "45"], ["40", "18"], ["36", "30"], ["40", "30"], ["60", "54"]]
    assert got == [
        ["unimodal (round 0)", "50.0", "20.0", "+0.310", "40.0", "10.0", "+0.200"],
        ["round 1", "61.0", "33.3", "+0.420", "45.0", "15.0", "+0.250"],
        ["round 2", "60.0", "30.0", "+0.400", "55.0", "25.0", "+0.350"],
        ["guided (val-chosen: img 1, txt 2)", "61.0", "33.3", "+0.420", "55.0", "25.0", "+0.350"],
        ["fused decoding", "70.0", "50.0", "+0.600", "68.0", "45.0", "+0.580"],
    ]
    # and the text table shows the same rows
    text = format_table(report, ceilings, fused_text=res.fused["text"]).splitlines()
    rows = [line.split("|") for line in text if "|" in line][2:]  # below the two header lines
    assert [[name.strip(), *a.split(), *b.split()] for name, a, b, _ in rows] == got
    # and each row's PMR as a share of its ceiling: the unimodal row against its own modality's
    assert [share.split() for *_, share in rows] == html_shares
    assert "87.5%" in raw and "item-level fusion 83.0" in raw

    # the plots exist, are PNGs and are what the page links to
    files = out.with_name("eval_files")
    assert sorted(p.name for p in files.iterdir()) == sorted(PLOT_FILES)
    for name in PLOT_FILES:
        data = (files / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        Image.open(files / name).verify()
    plot_srcs = [e.attrs["src"] for e in c.find(tag="img") if not e.attrs["src"].startswith("data:")]
    assert sorted(plot_srcs) == sorted(f"eval_files/{n}" for n in PLOT_FILES)

    # samples: half right, half wrong, and labelled truthfully
    cards = {e.attrs["data-story"]: e.attrs["data-exact"] for e in c.find("sample")}
    assert sorted(cards.values()) == ["false", "false", "true", "true"]
    assert all((v == "true") == (int(k[1:]) < 2) for k, v in cards.items())
    wrong_id = next(k for k, v in cards.items() if v == "false")
    story = next(s for s in stories if s.id == wrong_id)
    assert sentences_in(c, "gold", wrong_id) == story.sentences
    assert sentences_in(c, "predicted", wrong_id) == [story.sentences[1], story.sentences[0], story.sentences[2]]
    # the gold strip's arrows carry the round-0 adjacent-pair confidences of both modalities
    assert [e.text for e in c.find("c") if e.anc("data-story") == wrong_id and e.anc("data-kind") == "gold"] == [
        "img 0.90",
        "txt 0.70",
        "img 0.20",
        "txt 0.60",
    ]


def test_evaluation_report_sample_choice_is_seeded(tmp_path, monkeypatch):
    import iterwego.apps.report as report_mod

    monkeypatch.setattr(report_mod, "_write_plots", lambda *a, **k: ([], []))  # the plots play no part here
    res, stories = eval_inputs(tmp_path, n_stories=10, n_right=5)
    report = res.report({"image": 1, "text": 2})

    def chosen(seed, max_samples=4):
        c = check_html(
            evaluation_report(
                tmp_path / f"e{seed}.html",
                report=report,
                result=res,
                stories=stories,
                max_samples=max_samples,
                seed=seed,
            )
        )
        return sorted(e.attrs["data-story"] for e in c.find("sample"))

    assert chosen(7) == chosen(7)
    assert len({tuple(chosen(s)) for s in range(6)}) > 1
    # one group short: the other fills the remaining places
    assert len(chosen(0, max_samples=9)) == 9
    assert len(chosen(0, max_samples=50)) == 10


def test_evaluation_report_without_matplotlib_still_renders(tmp_path, monkeypatch):
    res, stories = eval_inputs(tmp_path)
    path = tmp_path / "eval.html"
    files = tmp_path / "eval_files"
    files.mkdir()
    (files / PLOT_FILES[0]).write_bytes(PNG_MAGIC + b"stale plot from an earlier run")
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = evaluation_report(path, report=res.report({"image": 1, "text": 2}), result=res, stories=stories)
    c = check_html(out)
    notes = " ".join(e.text for e in c.find("note"))
    assert "matplotlib is not installed" in notes and "iterwego[report]" in notes
    assert all(e.attrs["src"].startswith("data:") for e in c.find(tag="img"))
    assert not files.exists()  # the stale plot is gone, and so is the then-empty folder
    assert c.find("metrics", tag="table") and c.find("sample")


def test_evaluation_report_without_kept_orders(tmp_path):
    res = EvalResult(rounds={"image": [metric(0.5, 0.2, 0.3)]}, story_ids=["a", "b"])
    out = evaluation_report(tmp_path / "e.html", report=res.report({}), result=res, stories=[])
    c = check_html(out)
    notes = " ".join(e.text for e in c.find("note"))
    assert "keep_orders=True" in notes and not c.find("sample")
    assert [r[0] for r in table_rows(c) if r and r[0] not in ("variant", "Acc %")] == [
        "unimodal (round 0)",
        "guided (val-chosen: img 0, txt -)",
    ]


# ------------------------------------------------------------------ a real browser, where one is installed
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_order_report_renders_in_headless_chromium(tmp_path):
    imgs = make_images(tmp_path, 3)
    out = order_report([], [fused_result("S", imgs, SENTS, [1, 0, 2], [0.8, 0.3])], tmp_path / "o.html", gold=True)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            out.resolve().as_uri(),
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert shot.stat().st_size > 0 and shot.read_bytes().startswith(PNG_MAGIC)
    assert Image.open(shot).size == (1200, 900)
