"""Synthetic visual stories with a known, partly hidden order cue.

Each story is a handful of items that happen at hidden times ``t_0 < ... <
t_{n-1}`` drawn from ``{0, ..., T-1}``. An item's image shows a water tank
whose level encodes ``t`` (or a grey cloth over the tank, when the image hides
its cue) next to an identity object (a coloured shape); its sentence names the
object and, when the text shows its cue, the time as "hour seven". Everything
else (tint, noise, jitter, sentence template, ids, file order) is independent
of time, so the Bayes-optimal ordering accuracy is exactly computable; it is
written to ``ceilings.json`` (see :func:`story_ceiling`).

The output uses the product's standard SIND layout::

    OUT/{train,val,test}.story-in-sequence.json
    OUT/images/{split}/{photo_flickr_id}.png
    OUT/synth_meta.json     hidden truth: config, times, visibility, identities
    OUT/ceilings.json       Bayes-optimal expected PMR per split and modality

The full generative story is documented in ``docs/synthetic.md``.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from .readers import CEILINGS_FILE, load_ceilings, pmr_ceilings  # noqa: F401  (their home is the reader)

SPLITS = ("train", "val", "test")
GENERATOR = "iterwego.data.synth"
FORMAT_VERSION = 1
META_FILE = "synth_meta.json"

KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
# No blue and no grey: those are reserved for the water and the cloth, so a
# colour histogram alone never confuses an object with the time cue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 125, 15),
    "pink": (245, 120, 190),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
}
WATER_RGB = (20, 90, 230)
CLOTH_RGB = (140, 140, 140)
TANK_EMPTY_RGB = (250, 250, 250)
OUTLINE_RGB = (70, 70, 70)
BACKGROUND_RGB = (228, 228, 222)

HOUR_WORDS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
MAX_TIME_STEPS = len(HOUR_WORDS)

# Each template has one slot, ``{pre}`` (sentence start) or ``{post}``, for the
# time phrase; it is empty when the text hides the cue, which leaves a
# grammatical sentence. The template is drawn independently of time.
TEMPLATES = (
    "the {colour} {kind} waits by the tank{post}.",
    "{pre}we see the {colour} {kind} next to the tank.",
    "the {colour} {kind} checks the water{post}.",
    "a {colour} {kind} stands beside the tank{post}, watching the water.",
    "{pre}the {colour} {kind} looks at the water level.",
)

# ---- the "sky" family: another generator, built to test that recipes are not tuned to the tank alone.
# Its image cue is the sun's place on an arc across the sky (a cloud bank hides it), its text cue an
# ordinal bell ("after the ninth bell"), its hide rates are unequal and it has more time steps.
ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
)  # fmt: skip
SKY_TEMPLATES = (
    "{pre}the {colour} {kind} crosses the field.",
    "the {colour} {kind} rests on the grass{post}.",
    "{pre}a {colour} {kind} walks along the path under the sky.",
    "the {colour} {kind} looks up at the sky{post}, then moves on.",
    "our {colour} {kind} plays in the meadow{post}.",
    "{pre}the {colour} {kind} waits near the old fence.",
)
# Narrating sentences (SynthConfig.narrate): they tell the story without naming anything pictured, no object and
# no colour, as real captions often do ("then it started to rain"); the time phrase stays where the item shows it.
NARRATING_TEMPLATES = (
    "{pre}we had a great time.",
    "then it started to rain{post}.",
    "everyone was happy{post}.",
    "{pre}we talked for a while.",
    "the day went on{post}.",
)
SKY_NARRATING_TEMPLATES = (
    "{pre}we walked on.",
    "it got warmer{post}.",
    "{pre}nobody said a word.",
    "we stopped to rest{post}, then went on.",
    "the afternoon passed slowly{post}.",
)
SKY_TOP_RGB, SKY_BOTTOM_RGB = (120, 170, 235), (200, 225, 250)
SUN_RGB, SUN_RIM_RGB = (255, 255, 240), (255, 150, 40)
CLOUD_RGB = (205, 205, 210)
GRASS_RGB = (110, 170, 90)
BIRD_RGB = (60, 60, 70)

#: The families ``iterwego synth --family`` knows, with the parameters a family changes by default.
FAMILIES: dict[str, dict[str, Any]] = {
    "tank": {"hide_image": 0.3, "hide_text": 0.3, "time_steps": 12},
    "sky": {"hide_image": 0.2, "hide_text": 0.45, "time_steps": 16},
}

_ID_BASE, _ID_BLOCK = (
    100_000,
    100,
)  # story k's photo ids are random slots of [BASE + 100k, BASE + 100k + 100): unique, n <= 20


@dataclass
class SynthConfig:
    """Parameters of the synthetic dataset; the defaults are the embedded default data."""

    stories: int = 600  # total number of stories over train/val/test
    seed: int = 0  # the only source of randomness: same seed -> byte-identical output
    lengths: tuple[int, int] = (3, 8)  # story length range (LO, HI), both inclusive
    image_size: int = 64  # side of the square RGB images in pixels, 32..256
    time_steps: int | None = None  # T: hidden times are drawn from 0..T-1; HI <= T <= 20; None: family's (12 / 16)
    hide_image: float | None = None  # probability that an item's image hides its cue; None: family's (0.3 / 0.2)
    hide_text: float | None = None  # probability that an item's sentence omits its cue; None: family's (0.3 / 0.45)
    train_frac: float = 0.7  # share of stories in the train split
    val_frac: float = 0.15  # share of stories in the val split
    test_frac: float = 0.15  # share of stories in the test split (takes the rounding remainder)
    exif_rate: float = 0.0  # share of photos whose PNG carries an EXIF capture time (DateTimeOriginal, hidden time)
    clock_shift: float = 0.0  # hours; non-zero: a second camera, this far off, takes about half the timed photos
    family: str = "tank"  # generator: "tank" (water level, "hour seven") or "sky" (sun on an arc, "ninth bell")
    narrate: float = 0.0  # share of sentences that narrate: no object, no colour, the time cue kept where shown

    @classmethod
    def for_family(cls, family: str = "tank", **overrides: Any) -> "SynthConfig":
        """``SynthConfig(family=family, **overrides)`` without the ``None`` overrides (CLI options left unset).

        Fields a family sets (:data:`FAMILIES`) and that are not given take the family's value.
        """
        return cls(family=family, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown synth family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        for name, default in FAMILIES[self.family].items():  # unset: the family's own value
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.lengths = tuple(int(x) for x in self.lengths)  # type: ignore[assignment]  # JSON gives lists
        lo, hi = self.lengths if len(self.lengths) == 2 else (0, -1)
        if not 1 <= lo <= hi:
            raise ValueError(f"lengths must be (LO, HI) with 1 <= LO <= HI, got {self.lengths}")
        if int(self.stories) < 1:
            raise ValueError(f"stories must be >= 1, got {self.stories}")
        if not 32 <= int(self.image_size) <= 256:
            raise ValueError(f"image_size must be in 32..256, got {self.image_size}")
        if not hi <= self.time_steps <= MAX_TIME_STEPS:
            raise ValueError(
                f"time_steps must satisfy HI={hi} <= time_steps <= {MAX_TIME_STEPS}, got {self.time_steps}"
            )
        if hi > len(KINDS) * len(COLOURS):
            raise ValueError(f"HI={hi} exceeds the {len(KINDS) * len(COLOURS)} distinct identities")
        if not math.isfinite(self.clock_shift):
            raise ValueError(f"clock_shift must be a finite number of hours, got {self.clock_shift}")
        for name in ("hide_image", "hide_text", "train_frac", "val_frac", "test_frac", "exif_rate", "narrate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        total = self.train_frac + self.val_frac + self.test_frac
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train_frac + val_frac + test_frac must be 1, got {total}")

    def split_sizes(self) -> dict[str, int]:
        """Stories per split; train takes the rounding remainder so the sizes add up."""
        n_val = int(round(self.stories * self.val_frac))
        n_test = int(round(self.stories * self.test_frac))
        n_val = min(n_val, self.stories)
        n_test = min(n_test, self.stories - n_val)
        return {"train": self.stories - n_val - n_test, "val": n_val, "test": n_test}


# ------------------------------------------------------------------ ceilings
def story_ceiling(times: Sequence[int], visible: Sequence[bool], T: int) -> float:
    """Bayes-optimal probability of recovering the exact order of one story.

    ``times`` are the items' hidden times (any order), ``visible`` says which
    items show theirs to the observer, ``T`` is the number of time steps.

    Derivation: times are a uniform n-subset of ``{0..T-1}`` and visibility is
    independent of everything, so given the ``v`` visible times ``V`` the ``h =
    n - v`` hidden times are a uniform h-subset of the ``T - v`` free times, and
    the hidden items are exchangeable (identity carries no time information).
    Visible items are ordered by their times for free. Split the free times into
    gaps ``g_0..g_v`` around the sorted visible times. A prediction that puts
    ``c_k`` hidden items into gap ``k`` (``sum c_k = h``) is right with
    probability ``prod_k C(g_k, c_k) / C(T - v, h) / h!``: the counts must match
    and then the hidden items' order is a uniform guess. The optimum maximises
    the product over compositions ``c``, done here by a small DP over gaps.
    """
    times = [int(t) for t in times]
    visible = [bool(x) for x in visible]
    if len(times) != len(visible):
        raise ValueError(f"times and visible differ in length: {len(times)} vs {len(visible)}")
    if len(set(times)) != len(times) or any(not 0 <= t < T for t in times):
        raise ValueError(f"times must be distinct values in 0..{T - 1}, got {times}")
    vis_times = sorted(t for t, s in zip(times, visible) if s)
    v, h = len(vis_times), len(times) - len(vis_times)
    if h == 0:
        return 1.0
    bounds = [-1, *vis_times, T]
    gaps = [bounds[k + 1] - bounds[k] - 1 for k in range(v + 1)]
    # best[j] = max over ways to place j hidden items in the gaps seen so far of prod C(g, c); exact ints.
    best = [1] + [0] * h
    for g in gaps:
        best = [max(best[j - c] * math.comb(g, c) for c in range(j + 1)) for j in range(h + 1)]
    return best[h] / (math.comb(T - v, h) * math.factorial(h))


def narrating_bounds(times: Sequence[int], image_visible, text_visible, narrating, T: int) -> tuple[float, float]:
    """Upper bounds on the PMR of any order of one story's images and of its sentences when some sentences
    narrate (:attr:`SynthConfig.narrate`): ``(image bound, sentence bound)``.

    Both are at most the item-level fusion ceiling (which knows the true pairing). Beyond it, exchangeability:
    a narrating sentence whose time cue is hidden shows nothing that depends on its place (its template is
    drawn independently), so ``u`` such sentences are exchangeable given everything observable and no order of
    them is right with probability above ``1/u!``. Likewise an image that hides its time and whose sentence
    narrates cannot be linked to any sentence by content: ``u`` such images are exchangeable. The bounds are
    not tight (elimination and the other items' cues are not counted beyond the fusion ceiling).
    """
    iv, tv, nar = (np.asarray(x, dtype=bool) for x in (image_visible, text_visible, narrating))
    fused = story_ceiling(times, iv | tv, T)
    loose_images, loose_sentences = int((nar & ~iv).sum()), int((nar & ~tv).sum())
    return min(fused, 1 / math.factorial(loose_images)), min(fused, 1 / math.factorial(loose_sentences))


def _split_ceilings(records: list[dict], T: int) -> dict[str, Any]:
    if not records:
        return {"stories": 0, "items": 0, "image_pmr": None, "text_pmr": None, "fused_pmr": None, "chance_pmr": None}
    img, txt, fus, chance, bounds = [], [], [], [], []
    for r in records:
        iv, tv = np.asarray(r["image_visible"]), np.asarray(r["text_visible"])
        img.append(story_ceiling(r["times"], iv, T))
        txt.append(story_ceiling(r["times"], tv, T))
        fus.append(story_ceiling(r["times"], iv | tv, T))
        chance.append(1.0 / math.factorial(len(r["times"])))
        if "narrating" in r:
            bounds.append(narrating_bounds(r["times"], iv, tv, r["narrating"], T))
    out = {
        "stories": len(records),
        "items": int(sum(len(r["times"]) for r in records)),
        "image_pmr": float(np.mean(img)),  # images alone
        "text_pmr": float(np.mean(txt)),  # sentences alone
        "fused_pmr": float(np.mean(fus)),  # an item's time known when either modality shows it
        "chance_pmr": float(np.mean(chance)),  # a uniform random order, for scale
    }
    if bounds:  # narrating sentences: upper bounds per modality for orders that use both (narrating_bounds)
        out["fused_image_bound_pmr"] = float(np.mean([b[0] for b in bounds]))
        out["fused_text_bound_pmr"] = float(np.mean([b[1] for b in bounds]))
    return out


def ceilings_from_meta(data_dir: str | Path) -> dict[str, dict]:
    """The per-split ceilings of a synthetic dataset recomputed from its ``synth_meta.json`` (what
    ``ceilings.json`` holds, with the narrating bounds for data written before they were)."""
    meta = json.loads((Path(data_dir) / META_FILE).read_text())
    by_split: dict[str, list[dict]] = {}
    for v in meta["stories"].values():
        by_split.setdefault(v["split"], []).append(v)
    return {s: _split_ceilings(r, meta["config"]["time_steps"]) for s, r in by_split.items()}


# -------------------------------------------------------------- generation


def _story_rngs(seed: int, k: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent content and rendering generators of story ``k``.

    Keyed by (seed, k) alone, so a story's content does not depend on the image
    size, the number of stories or anything drawn for other stories.
    """
    content = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 0)))
    render = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 1)))
    return content, render


#: EXIF Model of the synthetic cameras; the second one (clock off by ``clock_shift`` hours) only with a shift.
CAMERAS = ("iterwego synth camera A", "iterwego synth camera B")
_FIRST_DAY = datetime(2024, 1, 1, 8, 0, 0)


def _capture_times(cfg: SynthConfig, k: int, times: Sequence[int]) -> list[tuple[str, str] | None]:
    """Per item in gold order: (EXIF DateTimeOriginal, camera Model) or None, from story k's own generator.

    A separate generator keeps every story's content and pixels the same whatever ``exif_rate`` is.
    Story k happens on day k, hidden time t at hour t (plus the shift on the second camera).
    """
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(k, 2)))
    draws = rng.random((len(times), 2))
    out: list[tuple[str, str] | None] = []
    for t, (u_timed, u_camera) in zip(times, draws):
        if u_timed >= cfg.exif_rate:
            out.append(None)
            continue
        second = cfg.clock_shift != 0 and u_camera < 0.5
        when = _FIRST_DAY + timedelta(days=k, hours=int(t) + (cfg.clock_shift if second else 0.0))
        out.append((when.strftime("%Y:%m:%d %H:%M:%S"), CAMERAS[int(second)]))
    return out


def _exif(capture: tuple[str, str]) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0110] = capture[1]  # Model
    exif.get_ifd(0x8769)[0x9003] = capture[0]  # Exif IFD: DateTimeOriginal
    return exif


def _sentence(template: str, colour: str, kind: str, hour: int | None, family: str = "tank") -> tuple[str, str]:
    """(tokenised lower-case text, natural original text) of one item; ``hour`` is ``t + 1``."""
    pre = post = ""
    if hour is not None:
        phrase = f"at hour {HOUR_WORDS[hour - 1]}" if family == "tank" else f"after the {ORDINAL_WORDS[hour - 1]} bell"
        if "{pre}" in template:
            pre = f"{phrase}, "
        else:
            post = f" {phrase}"
    original = template.format(pre=pre, post=post, colour=colour, kind=kind)
    original = original[0].upper() + original[1:]
    text = re.sub(r"\s*([.,!?;:])", r" \1", original.lower())
    return text, original


def _story_content(cfg: SynthConfig, k: int, rng: np.random.Generator) -> dict:
    """Everything about story ``k`` except pixels, in gold order."""
    lo, hi = cfg.lengths
    T = cfg.time_steps
    n = int(rng.integers(lo, hi + 1))
    times = np.sort(rng.choice(T, size=n, replace=False))
    ident = rng.choice(len(KINDS) * len(COLOURS), size=n, replace=False)
    kinds = [KINDS[i // len(COLOURS)] for i in ident]
    colours = [list(COLOURS)[i % len(COLOURS)] for i in ident]
    image_visible = rng.random(n) >= cfg.hide_image
    text_visible = rng.random(n) >= cfg.hide_text
    family_templates = TEMPLATES if cfg.family == "tank" else SKY_TEMPLATES
    templates = rng.integers(0, len(family_templates), size=n)
    # Ids are random slots inside the story's block, so sorting by id says nothing about the order.
    slots = rng.permutation(_ID_BLOCK)[:n]
    file_order = rng.permutation(n)
    narrating = np.zeros(n, bool)
    if cfg.narrate > 0:  # drawn last, so every other draw (and every image) is that of narrate=0
        narrating = rng.random(n) < cfg.narrate
        narrations = NARRATING_TEMPLATES if cfg.family == "tank" else SKY_NARRATING_TEMPLATES
        templates = np.where(narrating, rng.integers(0, len(narrations), size=n), templates)
    texts, originals = [], []
    for j in range(n):
        hour = int(times[j]) + 1 if text_visible[j] else None
        template = (narrations if narrating[j] else family_templates)[templates[j]]
        t, o = _sentence(template, colours[j], kinds[j], hour, cfg.family)
        texts.append(t)
        originals.append(o)
    extra = {"narrating": [bool(x) for x in narrating]} if cfg.narrate > 0 else {}
    return {
        **extra,
        "story_id": str(k),
        "times": [int(t) for t in times],
        "image_visible": [bool(x) for x in image_visible],
        "text_visible": [bool(x) for x in text_visible],
        "kinds": kinds,
        "colours": colours,
        "photo_ids": [str(_ID_BASE + k * _ID_BLOCK + int(s)) for s in slots],
        "text": texts,
        "original_text": originals,
        "file_order": [int(x) for x in file_order],
    }


def _tank_box(size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the tank outline, fixed for a given image size."""
    return round(0.08 * size), round(0.12 * size), round(0.42 * size), round(0.88 * size)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if kind == "cross":
        a = 0.35 * r
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
            (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if kind == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist()))
    return None


def _render(size: int, t: int, T: int, visible: bool, kind: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """One item's image; the water level is the only pixel feature that depends on ``t``."""
    tint = rng.integers(-12, 13, size=3)
    bg = tuple(int(c) for c in np.clip(np.asarray(BACKGROUND_RGB) + tint, 0, 255))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = _tank_box(size)
    w = max(1, size // 32)
    if visible:
        d.rectangle((x0, y0, x1, y1), fill=TANK_EMPTY_RGB, outline=OUTLINE_RGB, width=w)
        inner_top, inner_bot = y0 + w, y1 - w  # inclusive interior rows
        height = inner_bot - inner_top + 1
        level = max(1, round(height * (t + 1) / T))
        d.rectangle((x0 + w, inner_bot - level + 1, x1 - w, inner_bot), fill=WATER_RGB)
    else:
        m = max(1, size // 32)
        d.rectangle((x0 - m, y0 - m, x1 + m, y1 + m), fill=CLOTH_RGB)
    # Identity object on the right, with small jitter of position and size.
    jx, jy, js = rng.uniform(-1.0, 1.0, size=3)
    _draw_identity(d, kind, colour, size * (0.71 + 0.05 * jx), size * (0.5 + 0.05 * jy), size * (0.16 + 0.03 * js))
    noise = rng.integers(-6, 7, size=(size, size, 3), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _draw_identity(d: ImageDraw.ImageDraw, kind: str, colour: str, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[colour]
    poly = _shape_polygon(kind, cx, cy, r)
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = 0.8 * r
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        assert poly is not None, kind
        d.polygon(poly, fill=fill)


def sun_centre(size: int, t: int, T: int) -> tuple[float, float]:
    """Where the sky family's sun stands at time ``t``: on a half circle from the left horizon to the right."""
    angle = math.pi * (t + 0.5) / T
    cx, cy, rx, ry = 0.5 * size, 0.62 * size, 0.38 * size, 0.48 * size
    return cx - rx * math.cos(angle), cy - ry * math.sin(angle)


def _render_sky(
    size: int, t: int, T: int, visible: bool, kind: str, colour: str, rng: np.random.Generator
) -> Image.Image:
    """A sky-family image: the sun's place on its arc is the only pixel feature that depends on ``t``.

    A hidden cue is a cloud bank over the whole arc, the same for every hidden item. Birds (0-3, drawn at
    random places) and the tint are distractors independent of time; the identity stands on the grass.
    """
    tint = rng.integers(-15, 16, size=3)
    top = np.clip(np.asarray(SKY_TOP_RGB) + tint, 0, 255)
    bottom = np.clip(np.asarray(SKY_BOTTOM_RGB) + tint, 0, 255)
    ground = round(0.66 * size)
    rows = np.linspace(0.0, 1.0, ground)[:, None]
    arr = np.empty((size, size, 3), dtype=np.float64)
    arr[:ground] = ((1 - rows) * top + rows * bottom)[:, None, :]
    arr[ground:] = GRASS_RGB
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        bx, by = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.55) * size
        w = 0.05 * size
        d.line([(bx - w, by - 0.5 * w), (bx, by), (bx + w, by - 0.5 * w)], fill=BIRD_RGB, width=max(1, size // 32))
    if visible:
        sx, sy = sun_centre(size, t, T)
        r = 0.085 * size
        d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=SUN_RGB, outline=SUN_RIM_RGB, width=max(1, size // 21))
    else:
        d.rectangle((0, round(0.04 * size), size - 1, ground - 1), fill=CLOUD_RGB)
    jx, js = rng.uniform(-1.0, 1.0, size=2)
    _draw_identity(d, kind, colour, size * (0.5 + 0.25 * jx), size * 0.83, size * (0.12 + 0.02 * js))
    noise = rng.integers(-5, 6, size=(size, size, 3), dtype=np.int16)
    out = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def _looks_like_synth(out: Path) -> bool:
    meta = out / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _prepare_out(out: Path) -> None:
    """Create ``out`` or clear a previous synth output in it; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DataError("output exists and is not a directory", path=str(out))
    if out.is_dir() and any(out.iterdir()):
        if not _looks_like_synth(out):
            raise DataError(
                f"directory is not empty and holds no {META_FILE} from a previous synth run; choose an empty directory",
                path=str(out),
            )
        # Only remove what synth writes, so stale images of a larger previous run do not linger.
        for split in SPLITS:
            img_dir = out / "images" / split
            if img_dir.is_dir():
                for p in img_dir.glob("*.png"):
                    p.unlink()
            (out / f"{split}.story-in-sequence.json").unlink(missing_ok=True)
        (out / CEILINGS_FILE).unlink(missing_ok=True)
        (out / META_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _split_file(cfg: SynthConfig, split: str) -> dict:
    """An empty ``{split}.story-in-sequence.json`` document."""
    info = {"generator": GENERATOR, "version": FORMAT_VERSION, "seed": cfg.seed, "split": split}
    return {"images": [], "albums": [], "annotations": [], "info": info, "type": "story_in_sequence"}


def _annotation(st: dict, j: int, album: str) -> dict:
    """Item ``j`` (gold position) of story ``st`` as a SIND annotation."""
    pid = st["photo_ids"][j]
    return {
        "story_id": st["story_id"],
        "photo_flickr_id": pid,
        "worker_arranged_photo_order": j,
        "text": st["text"][j],
        "original_text": st["original_text"][j],
        "album_id": album,
        "storylet_id": pid,
        "setting": "",
        "tier": "story-in-sequence",
        "worker_id": "synth",
    }


def _write_story(out: Path, cfg: SynthConfig, k: int, split: str, doc: dict, buf: io.BytesIO) -> dict:
    """Draw story ``k``, write its images under ``out`` and its rows into its split's ``doc``; returns its
    hidden truth (times, visibility, identities, capture times)."""
    crng, rrng = _story_rngs(cfg.seed, k)
    st = _story_content(cfg, k, crng)
    capture = _capture_times(cfg, k, st["times"]) if cfg.exif_rate > 0 else [None] * len(st["times"])
    album = f"album{st['story_id']}"
    render = _render if cfg.family == "tank" else _render_sky
    # Render and write in the shuffled file order: nothing on disk follows the gold order.
    for j in st["file_order"]:
        pid = st["photo_ids"][j]
        img = render(
            cfg.image_size,
            st["times"][j],
            cfg.time_steps,
            st["image_visible"][j],
            st["kinds"][j],
            st["colours"][j],
            rrng,
        )
        buf.seek(0)
        buf.truncate()
        extra = {"exif": _exif(capture[j])} if capture[j] else {}
        img.save(buf, format="PNG", compress_level=6, **extra)
        (out / "images" / split / f"{pid}.png").write_bytes(buf.getvalue())
        doc["images"].append({"id": pid, "album_id": album, "title": "", "tags": ""})
        doc["annotations"].append([_annotation(st, j, album)])
    truth = {key: st[key] for key in ("times", "image_visible", "text_visible", "kinds", "colours", "photo_ids")}
    if "narrating" in st:  # which sentences name nothing pictured (SynthConfig.narrate)
        truth["narrating"] = st["narrating"]
    if cfg.exif_rate > 0:  # the EXIF written, in gold order (None: no capture time)
        truth["capture_times"] = [c and c[0] for c in capture]
        truth["cameras"] = [c and c[1] for c in capture]
    return truth


def synthesize(
    out: str | Path, cfg: SynthConfig | None = None, progress: bool = False, splits: Sequence[str] = SPLITS
) -> dict:
    """Write a synthetic dataset in the SIND layout under ``out`` and return a JSON-able summary.

    Refuses (``DataError``) a non-empty directory unless it holds a previous
    synth output, which is then replaced. Output bytes depend only on ``cfg``.
    ``splits`` writes only those splits: their stories are byte for byte those of the whole dataset (each story
    draws from generators of its own), e.g. the demo's test split again with narrating sentences.
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    start = time.perf_counter()
    splits = [s for s in SPLITS if s in splits]
    _prepare_out(out)
    sizes = cfg.split_sizes()
    split_of = [s for s in SPLITS for _ in range(sizes[s])]  # stories are iid, so contiguous blocks are fine
    files = {s: _split_file(cfg, s) for s in splits}
    records: dict[str, list[dict]] = {s: [] for s in splits}
    meta_stories: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes[s] for s in splits), desc="synth", unit="story")
    buf = io.BytesIO()
    for k in range(cfg.stories):
        split = split_of[k]
        if split not in files:
            continue
        truth = _write_story(out, cfg, k, split, files[split], buf)
        meta_stories[str(k)] = {"split": split, **truth}
        records[split].append(truth)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    for s in splits:
        _dump(out / f"{s}.story-in-sequence.json", files[s])
    ceilings = {s: _split_ceilings(records[s], cfg.time_steps) for s in splits}
    _dump(out / CEILINGS_FILE, ceilings)
    _dump(
        out / META_FILE,
        {"generator": GENERATOR, "version": FORMAT_VERSION, "config": asdict(cfg), "stories": meta_stories},
    )
    return {
        "out": str(out),
        "stories": {s: sizes[s] for s in splits},
        "items": {s: ceilings[s]["items"] for s in splits},
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "time_steps": cfg.time_steps,
        "ceilings": ceilings.get("test"),
        "seconds": round(time.perf_counter() - start, 3),
    }
