"""The story data model and the readers that build it.

A :class:`Story` is an id plus its items **in gold order**. Readers never
shuffle: shuffling happens at training/evaluation time with a seeded
generator (see :func:`iterwego.data.features.make_batch`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DataError, ImageError

__all__ = [
    "Item",
    "Story",
    "read_vist",
    "read_tacos",
    "read_jsonl",
    "split_file",
    "split_image_dir",
    "load_split",
    "load_ceilings",
    "pmr_ceilings",
    "dataset_stats",
    "format_stats",
]


@dataclass(frozen=True, slots=True)  # slots: SIND's train split holds 200,000 of them
class Item:
    """One step of a story: an image, a sentence, or both."""

    image: str | None = None  # path to the image file (resolved when read)
    sentence: str | None = None  # the sentence, as chosen by the reader's text field
    key: str | None = None  # stable id of the item inside its corpus (e.g. a Flickr photo id)


@dataclass
class Story:
    """A story id and its items in gold order."""

    id: str
    items: list[Item]
    meta: dict = field(default_factory=dict)  # reader-specific extras (album id, source line, ...)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def images(self) -> list[str | None]:
        return [it.image for it in self.items]

    @property
    def sentences(self) -> list[str | None]:
        return [it.sentence for it in self.items]

    @property
    def has_images(self) -> bool:
        return bool(self.items) and all(it.image is not None for it in self.items)

    @property
    def has_sentences(self) -> bool:
        return bool(self.items) and all(it.sentence is not None for it in self.items)


# =====================================================================
# Readers
#
# Every reader returns stories in gold order, in the order they first appear
# in the file, and raises DataError (one line: file, then story id or line
# number) for anything malformed. Readers never shuffle.
# =====================================================================

#: Formats :func:`load_split` and :func:`dataset_stats` understand. ``tacos`` is
#: the VIST layout under another name.
FORMATS = ("vist", "tacos", "jsonl")

# Photo files are looked up as <photo_flickr_id><ext>; the first hit in this
# order wins when several exist. Upper-case variants rank right after their
# lower-case form, and .jpeg last because VIST itself never uses it.
_VIST_EXTS = (".jpg", ".JPG", ".png", ".PNG", ".gif", ".GIF", ".bmp", ".BMP", ".jpeg", ".JPEG")
_VIST_EXT_RANK = {e: i for i, e in enumerate(_VIST_EXTS)}

# Image checks are I/O plus C decoding that releases the GIL: threads suffice.
_CHECK_THREADS = min(16, 2 * (os.cpu_count() or 1))


def _read_bytes(path: Path, expected: str = "a file") -> bytes:
    """The file's bytes, or a one-line DataError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except IsADirectoryError:
        raise DataError(f"is a directory, expected {expected}", path=str(path)) from None
    except OSError as err:
        raise DataError(f"cannot read file ({err.strerror or err})", path=str(path)) from None


def read_text(path: Path) -> str:
    """The file's text, strict UTF-8 (a BOM is tolerated)."""
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})", path=str(path), line=line
        ) from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_id(x: object) -> str | None:
    """Ids may be JSON strings or integers; anything else is a type error (None)."""
    if isinstance(x, str) and x != "":
        return x
    if _is_int(x):
        return str(x)
    return None


class _ImageIndex:
    """Maps photo ids to files in one directory, listing the directory only once.

    Probing ten candidate names per photo would be ~2M stat calls for SIND's
    train split; one scandir is far cheaper, especially on network storage.
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.exists = directory.is_dir()
        self._best: dict[str, tuple[int, str]] = {}
        if not self.exists:
            return
        with os.scandir(directory) as entries:
            for e in entries:
                stem, dot, ext = e.name.rpartition(".")
                rank = _VIST_EXT_RANK.get(dot + ext)
                if rank is None or not stem:
                    continue
                prev = self._best.get(stem)
                if prev is None or rank < prev[0]:
                    self._best[stem] = (rank, e.name)

    def find(self, photo_id: str) -> str | None:
        hit = self._best.get(photo_id)
        return str(self.dir / hit[1]) if hit else None

    def expected(self, photo_id: str) -> str:
        """Where the photo would be; used (unchecked) when it is missing and checks are off."""
        return str(self.dir / f"{photo_id}.jpg")


def _check_story_images(source: Path, wanted: list[tuple[str, str, int | None]]) -> None:
    """Raise ImageError for the first (in file order) unusable image; ``wanted`` is [(image, story id, line)]."""
    from ..images import quick_check_image

    unique = list(dict.fromkeys(w[0] for w in wanted))
    if not unique:
        return
    with ThreadPoolExecutor(max_workers=min(_CHECK_THREADS, len(unique))) as pool:
        reasons = dict(zip(unique, pool.map(quick_check_image, unique)))
    for img, sid, line in wanted:
        if reasons[img] is not None:
            raise ImageError(f"image {img}: {reasons[img]}", path=str(source), story=sid, line=line)


def _vist_record(ann: object, k: int, path: Path, text_field: str) -> tuple[str, str, int, str, dict]:
    """Validate annotations[k]; return (story_id, photo_id, position, sentence, extras)."""
    where = f"annotations[{k}]"
    if isinstance(ann, list):
        if len(ann) != 1 or not isinstance(ann[0], dict):
            raise DataError(f"{where}: expected a one-element list holding an object", path=str(path))
        ann = ann[0]
    elif not isinstance(ann, dict):  # tolerate a bare object, which is what the list wraps
        raise DataError(
            f"{where}: expected a one-element list holding an object, got {type(ann).__name__}", path=str(path)
        )
    raw_sid = ann.get("story_id")
    sid = _as_id(raw_sid)
    if "story_id" not in ann:
        raise DataError(f"{where}: missing key 'story_id'", path=str(path))
    if sid is None:
        raise DataError(f"{where}: 'story_id' must be a non-empty string or integer, got {raw_sid!r}", path=str(path))
    for key in ("photo_flickr_id", "worker_arranged_photo_order", text_field):
        if key not in ann:
            raise DataError(f"{where}: missing key {key!r}", path=str(path), story=sid)
    pid = _as_id(ann["photo_flickr_id"])
    if pid is None:
        raise DataError(
            f"{where}: 'photo_flickr_id' must be a non-empty string or integer, got {ann['photo_flickr_id']!r}",
            path=str(path),
            story=sid,
        )
    pos = ann["worker_arranged_photo_order"]
    if not _is_int(pos):
        raise DataError(
            f"{where}: 'worker_arranged_photo_order' must be an integer, got {pos!r}", path=str(path), story=sid
        )
    sent = ann[text_field]
    if not isinstance(sent, str):
        raise DataError(
            f"{where}: {text_field!r} must be a string, got {type(sent).__name__}", path=str(path), story=sid
        )
    extras = {key: ann[key] for key in ("album_id", "storylet_id") if key in ann}
    return sid, pid, pos, sent, extras


_VIST_KEEP = ("story_id", "photo_flickr_id", "worker_arranged_photo_order", "album_id", "storylet_id")


def _slim_annotation(text_field: str):
    """A ``json`` object hook that keeps only what the reader uses of each annotation (an object with a
    ``photo_flickr_id``): at SIND's size the unused fields (the other text, worker ids, ...) would double
    the memory of parsing."""
    keep = frozenset((*_VIST_KEEP, text_field))

    def hook(pairs: list[tuple[str, object]]) -> dict:
        d = dict(pairs)
        if "photo_flickr_id" in d and "story_id" in d:
            return {k: v for k, v in d.items() if k in keep}
        return d

    return hook


def _check_positions(positions: list[int], n: int, path: Path, sid: str, what: str) -> None:
    """Positions must be exactly 0..n-1 (raises DataError naming duplicates or gaps)."""
    if sorted(positions) == list(range(n)):
        return
    dups = sorted(p for p, c in Counter(positions).items() if c > 1)
    if dups:
        raise DataError(f"duplicate {what} {dups[0]}", path=str(path), story=sid)
    raise DataError(f"{what} values {sorted(positions)} are not 0..{n - 1}", path=str(path), story=sid)


def read_vist(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    *,
    text_field: str = "text",
    check_images: bool = True,
) -> list[Story]:
    """Read a VIST / SIND ``*.story-in-sequence.json`` file.

    ``annotations`` holds one-element lists of objects with ``story_id``,
    ``photo_flickr_id``, ``worker_arranged_photo_order`` and the sentence under
    ``text_field`` (``"text"``: lower-cased and tokenised; ``"original_text"``:
    as written). Annotations are grouped by ``story_id`` (stories keep the order
    in which they first appear) and each story is put in gold order by
    ``worker_arranged_photo_order`` -- never by file order -- which must be
    exactly ``0..n-1``. Any length ``n >= 1`` is accepted.

    Images are ``<photo_flickr_id>.jpg/.png/.gif/.bmp`` (upper-case extensions
    too; the first in that order wins) directly in ``image_dir``. ``Item.image``
    is the resolved path, ``Item.key`` the photo id. With ``image_dir=None``
    items carry no image (text-only use). With ``check_images=False`` a missing
    photo gets its expected ``<id>.jpg`` path, so whoever opens it later gets a
    clear ImageError rather than a substitute picture.

    ``check_images=True`` verifies, in a thread pool, that every image exists,
    is recognised by Pillow and is not truncated (see
    :func:`iterwego.images.quick_check_image`).

    ``Story.meta`` holds ``source`` (this file), ``album_id`` when present, and
    per-item ``storylet_ids`` when present.

    Raises:
        DataError: unreadable file, non-UTF-8 bytes, malformed JSON (with line),
            missing keys, wrong types, duplicate or gapped positions, no stories.
        ImageError: a missing or unreadable image while ``check_images`` is on.
    """
    path = Path(json_path)
    groups = _vist_groups(path, text_field)
    index = _ImageIndex(Path(image_dir).resolve()) if image_dir is not None else None
    if index is not None and check_images and not index.exists:
        first = next(iter(groups))
        raise ImageError(f"image directory {index.dir} not found", path=str(path), story=first)
    wanted: list[tuple[str, str, int | None]] = []
    stories = [_vist_story(path, sid, recs, index, wanted if check_images else None) for sid, recs in groups.items()]
    if check_images:
        _check_story_images(path, wanted)
    return stories


def _vist_groups(path: Path, text_field: str) -> dict[str, list[tuple[str, str, int, str, dict]]]:
    """The file's annotation records (:func:`_vist_record`) grouped by story, stories in first-seen order."""
    try:
        doc = json.loads(read_text(path), object_pairs_hook=_slim_annotation(text_field))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg} (column {err.colno})", path=str(path), line=err.lineno) from None
    if not isinstance(doc, dict):
        raise DataError(f"expected a JSON object with key 'annotations', got {type(doc).__name__}", path=str(path))
    if "annotations" not in doc:
        raise DataError("missing key 'annotations'", path=str(path))
    anns = doc["annotations"]
    if not isinstance(anns, list):
        raise DataError(f"'annotations' must be a list, got {type(anns).__name__}", path=str(path))
    if not anns:
        raise DataError("'annotations' is empty: the file holds no stories", path=str(path))
    groups: dict[str, list[tuple[str, str, int, str, dict]]] = {}
    for k, ann in enumerate(anns):
        rec = _vist_record(ann, k, path, text_field)
        groups.setdefault(rec[0], []).append(rec)
    return groups


def _vist_story(path: Path, sid: str, recs: list, index: "_ImageIndex | None", wanted: list | None) -> Story:
    """Story ``sid`` in gold order from its annotation records; with ``wanted`` (images are checked), every
    image found is added to it for :func:`_check_story_images`, and a missing one raises."""
    _check_positions([r[2] for r in recs], len(recs), path, sid, "worker_arranged_photo_order")
    recs.sort(key=lambda r: r[2])
    items = []
    for _, pid, _, sent, _ in recs:
        img = None
        if index is not None:
            img = index.find(pid)
            if img is None:
                if wanted is not None:
                    raise ImageError(
                        f"no image for photo {pid} in {index.dir} (looked for {pid}.jpg/.png/.gif/.bmp)",
                        path=str(path),
                        story=sid,
                    )
                img = index.expected(pid)
            elif wanted is not None:
                wanted.append((img, sid, None))
        items.append(Item(image=img, sentence=sent, key=pid))
    meta: dict = {"source": str(path)}
    if "album_id" in recs[0][4]:
        meta["album_id"] = recs[0][4]["album_id"]
    if all("storylet_id" in r[4] for r in recs):
        meta["storylet_ids"] = [r[4]["storylet_id"] for r in recs]
    return Story(id=sid, items=items, meta=meta)


def read_tacos(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    *,
    text_field: str = "text",
    check_images: bool = True,
) -> list[Story]:
    """Read a TACoS-Ordering split file.

    The released TACoS-Ordering data uses the VIST layout (video frames in the
    place of Flickr photos), so this is :func:`read_vist` under its own name;
    sequence lengths vary (they are not always 5) and nothing here assumes a
    length.
    """
    return read_vist(json_path, image_dir, text_field=text_field, check_images=check_images)


def _str_list(obj: dict, key: str, path: Path, lineno: int, sid: str) -> list[str] | None:
    val = obj.get(key)
    if val is None:
        return None
    if not isinstance(val, list):
        raise DataError(
            f"{key!r} must be a list of strings, got {type(val).__name__}", path=str(path), line=lineno, story=sid
        )
    for i, v in enumerate(val):
        if not isinstance(v, str):
            raise DataError(
                f"{key}[{i}] must be a string, got {type(v).__name__}", path=str(path), line=lineno, story=sid
            )
    return val


def read_jsonl(
    path: str | os.PathLike,
    *,
    check_images: bool = True,
    image_root: str | os.PathLike | None = None,
) -> list[Story]:
    """Read users' own stories: one JSON object per line, items in gold order.

    Each line is ``{"id": ..., "images": [...], "sentences": [...]}``; ``id``
    (string or integer, unique in the file) is required, either list may be
    absent (or ``null``) but not both, and when both are present they must have
    the same, non-zero length. Relative image paths are resolved against
    ``image_root`` if given, else the JSONL file's own directory; absolute
    paths are kept. ``Item.key`` is the image path as written in the file.
    Blank lines are skipped. Other keys in the object are kept in
    ``Story.meta`` together with ``source`` and ``line``.

    Raises:
        DataError: unreadable file, non-UTF-8 bytes, malformed JSON, missing
            ``id``, wrong types, empty story, count mismatch, duplicate id --
            always with the line number.
        ImageError: a missing or unreadable image while ``check_images`` is on.
    """
    p = Path(path)
    base = Path(image_root if image_root is not None else p.parent).resolve()
    stories: list[Story] = []
    seen: dict[str, int] = {}
    wanted: list[tuple[str, str, int | None]] = []
    for lineno, obj in _jsonl_objects(p):
        if "id" not in obj:
            raise DataError("missing key 'id'", path=str(p), line=lineno)
        sid = _as_id(obj["id"])
        if sid is None:
            raise DataError(f"'id' must be a non-empty string or integer, got {obj['id']!r}", path=str(p), line=lineno)
        if sid in seen:
            raise DataError(f"duplicate id (first used on line {seen[sid]})", path=str(p), line=lineno, story=sid)
        seen[sid] = lineno
        stories.append(_jsonl_story(p, lineno, sid, obj, base, wanted if check_images else None))
    if not stories:
        raise DataError("no stories (the file is empty)", path=str(p))
    if check_images:
        _check_story_images(p, wanted)
    return stories


def _jsonl_objects(p: Path):
    """``(line number, object)`` for each non-blank line of a JSONL file (each must be a JSON object)."""
    raw = _read_bytes(p, "a .jsonl file")
    for lineno, bline in enumerate(raw.split(b"\n"), 1):
        try:
            line = bline.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"not valid UTF-8 (byte 0x{bline[err.start]:02x} at column {err.start + 1})", path=str(p), line=lineno
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON: {err.msg} (column {err.colno})", path=str(p), line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(p), line=lineno)
        yield lineno, obj


def _jsonl_story(p: Path, lineno: int, sid: str, obj: dict, base: Path, wanted: list | None) -> Story:
    """The story of one JSONL line; with ``wanted`` (images are checked), its image paths are added to it."""
    images = _str_list(obj, "images", p, lineno, sid)
    sentences = _str_list(obj, "sentences", p, lineno, sid)
    if images is None and sentences is None:
        raise DataError(
            "missing key: a story needs 'images' or 'sentences' (or both)", path=str(p), line=lineno, story=sid
        )
    if images is not None and sentences is not None and len(images) != len(sentences):
        raise DataError(f"{len(images)} images but {len(sentences)} sentences", path=str(p), line=lineno, story=sid)
    n = len(images if images is not None else sentences)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("empty story (no items)", path=str(p), line=lineno, story=sid)
    items = []
    for i in range(n):
        img = key = None
        if images is not None:
            if not images[i].strip():
                raise DataError(f"images[{i}] is an empty path", path=str(p), line=lineno, story=sid)
            key = images[i]
            ip = Path(images[i])
            img = str(ip if ip.is_absolute() else base / ip)
            if wanted is not None:
                wanted.append((img, sid, lineno))
        items.append(Item(image=img, sentence=sentences[i] if sentences is not None else None, key=key))
    meta = {k: v for k, v in obj.items() if k not in ("id", "images", "sentences")}
    meta.update(source=str(p), line=lineno)
    return Story(id=sid, items=items, meta=meta)


# ----------------------------------------------------------------- layout
def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def split_file(data: str | os.PathLike, split: str, fmt: str = "vist") -> Path:
    """Where the standard layout keeps ``split``: ``DIR/{split}.story-in-sequence.json`` or ``DIR/{split}.jsonl``.

    For ``fmt="jsonl"`` a ``data`` that is itself a file is returned as is.
    """
    d = Path(data)
    if _check_fmt(fmt) == "jsonl":
        return d if d.is_file() else d / f"{split}.jsonl"
    return d / f"{split}.story-in-sequence.json"


def split_image_dir(data: str | os.PathLike, split: str, image_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding ``split``'s images in the VIST/TACoS layout.

    Without ``image_dir``: ``DIR/images/{split}/``. With it: ``image_dir/{split}/``
    if that directory exists (SIND's own per-split layout), otherwise
    ``image_dir`` itself (all images in one place) -- the per-split
    subdirectory wins when both could apply.
    """
    if image_dir is None:
        return Path(data) / "images" / split
    per_split = Path(image_dir) / split
    return per_split if per_split.is_dir() else Path(image_dir)


def load_split(
    data: str | os.PathLike,
    split: str,
    *,
    fmt: str = "vist",
    image_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    check_images: bool = True,
) -> list[Story]:
    """Load one split from the product's standard layout.

    ``fmt="vist"`` (or ``"tacos"``, the same layout): ``DIR/{split}.story-in-sequence.json``
    with images found by :func:`split_image_dir` (``DIR/images/{split}/`` unless
    ``image_dir`` overrides it). ``fmt="jsonl"``: ``DIR/{split}.jsonl``, or
    ``data`` may be a ``.jsonl`` file itself, in which case ``split`` is
    ignored; ``image_dir`` then overrides the base of relative image paths.

    Raises:
        DataError: the directory or split file does not exist, or anything the
            readers reject (see :func:`read_vist`, :func:`read_jsonl`).
    """
    fmt = _check_fmt(fmt)
    d = Path(data)
    if not d.exists():
        raise DataError("data directory not found", path=str(d))
    path = split_file(d, split, fmt)
    if not path.is_file():
        raise DataError(f"split {split!r} not found (expected {path.name} in {d})", path=str(path))
    if fmt == "jsonl":
        return read_jsonl(path, check_images=check_images, image_root=image_dir)
    reader = read_tacos if fmt == "tacos" else read_vist
    return reader(path, split_image_dir(d, split, image_dir), text_field=text_field, check_images=check_images)


# ----------------------------------------------------------------- ceilings
#: A synthetic dataset's Bayes-optimal PMRs per split and modality, beside its splits (see :mod:`iterwego.data.synth`).
CEILINGS_FILE = "ceilings.json"
_CEILING_SPLITS = ("train", "val", "test")


def load_ceilings(data_dir: str | os.PathLike) -> dict | None:
    """The ``ceilings.json`` of a dataset (keys train/val/test), or None if the directory has none (real data)."""
    path = Path(data_dir) / CEILINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read ceilings: {err}", path=str(path)) from None
    if not isinstance(data, dict) or any(not isinstance(data.get(s), dict) for s in _CEILING_SPLITS):
        raise DataError("expected an object with train/val/test entries", path=str(path))
    return data


def pmr_ceilings(data_dir: str | os.PathLike, split: str) -> dict | None:
    """``{"image", "text", "fused"}`` Bayes-optimal PMRs of ``split`` for metric tables, or None (real data,
    or an unreadable ``ceilings.json``: a table without ceilings is still a table). Data with narrating sentences
    adds ``"fused_image"`` and ``"fused_text"``: upper bounds for orders that use both modalities."""
    try:
        c = (load_ceilings(data_dir) or {}).get(split) or {}
    except DataError:
        return None
    out = {k: float(c[f"{k}_pmr"]) for k in ("image", "text", "fused") if isinstance(c.get(f"{k}_pmr"), (int, float))}
    if len(out) < 3:
        return None
    for m in ("image", "text"):  # narrating sentences: tighter upper bounds per modality (synth.narrating_bounds)
        if isinstance(c.get(f"fused_{m}_bound_pmr"), (int, float)):
            out[f"fused_{m}"] = float(c[f"fused_{m}_bound_pmr"])
    return out


# ----------------------------------------------------------------- stats
_SHOW = 10  # missing/unreadable paths listed by format_stats per split


def _split_stats(stories: list[Story], path: Path) -> dict:
    from ..images import check_image

    lengths = Counter(len(s) for s in stories)
    words = [len(it.sentence.split()) for s in stories for it in s.items if it.sentence is not None]
    empty = sum(1 for s in stories for it in s.items if it.sentence is not None and not it.sentence.strip())
    images = list(dict.fromkeys(it.image for s in stories for it in s.items if it.image is not None))
    missing = [p for p in images if not os.path.isfile(p)]
    present = [p for p in images if os.path.isfile(p)]
    unreadable: list[list[str]] = []
    if present:
        with ThreadPoolExecutor(max_workers=min(_CHECK_THREADS, len(present))) as pool:
            for p, why in zip(present, pool.map(check_image, present)):
                if why is not None:
                    unreadable.append([p, why])
    return {
        "present": True,
        "path": str(path),
        "stories": len(stories),
        "items": sum(lengths[n] * n for n in lengths),
        "lengths": {n: lengths[n] for n in sorted(lengths)},
        "mean_sentence_words": (sum(words) / len(words)) if words else None,
        "sentences": len(words),
        "empty_sentences": empty,
        "images": len(images),
        "images_missing": missing,
        "images_unreadable": unreadable,
    }


def dataset_stats(
    data: str | os.PathLike,
    *,
    fmt: str = "vist",
    image_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict:
    """Count stories, items and problems per split without stopping at bad images.

    Returns ``{"data", "format", "splits": {split: {...}}, "problems": [...]}``.
    A present split has ``stories``, ``items``, ``lengths`` (``{n: count}``),
    ``mean_sentence_words``, ``sentences``, ``empty_sentences``, ``images``,
    ``images_missing`` (paths) and ``images_unreadable`` (``[path, reason]``;
    each existing image is fully decoded, in a thread pool). An absent split is
    ``{"present": False, "path": ...}``. ``problems`` has one line per split
    with missing or unreadable images (what ``stats --strict`` fails on); empty
    sentences are counted but are not a problem, as models accept them. For ``fmt="jsonl"``
    with ``data`` a file, the one split is named after the file.

    Raises:
        DataError: ``data`` does not exist, none of the split files exist, or a
            present split file is malformed (images never raise here).
    """
    fmt = _check_fmt(fmt)
    d = Path(data)
    if not d.exists():
        raise DataError("data directory not found", path=str(d))
    if fmt == "jsonl" and d.is_file():
        splits = (d.stem,)
    if not splits:
        raise ValueError("splits must name at least one split")
    out: dict = {"data": str(d), "format": fmt, "splits": {}, "problems": []}
    paths = {s: split_file(d, s, fmt) for s in splits}
    if not any(p.is_file() for p in paths.values()):
        looked = ", ".join(p.name for p in paths.values())
        raise DataError(f"no split files found (looked for {looked})", path=str(d))
    problems: list[str] = out["problems"]
    for split, path in paths.items():
        if not path.is_file():
            out["splits"][split] = {"present": False, "path": str(path)}
            continue
        stories = load_split(d, split, fmt=fmt, image_dir=image_dir, text_field=text_field, check_images=False)
        st = _split_stats(stories, path)
        out["splits"][split] = st
        if st["images_missing"]:
            problems.append(f"{split}: {len(st['images_missing'])} image(s) missing, e.g. {st['images_missing'][0]}")
        if st["images_unreadable"]:
            p, why = st["images_unreadable"][0]
            problems.append(f"{split}: {len(st['images_unreadable'])} image(s) unreadable, e.g. {p}: {why}")
    return out


def format_stats(stats: dict) -> str:
    """Render :func:`dataset_stats` output as a plain-text table plus the problem list."""
    head = ("split", "stories", "items", "lengths", "words/sent", "empty sent", "images", "missing", "unreadable")
    rows: list[tuple[str, ...]] = []
    absent: list[str] = []
    for split, st in stats["splits"].items():
        if not st.get("present"):
            absent.append(f"{split}: absent ({st['path']})")
            continue
        lengths = st["lengths"]
        span = f"{min(lengths)}-{max(lengths)}" if len(lengths) > 1 else f"{next(iter(lengths))}"
        mw = st["mean_sentence_words"]
        rows.append(
            (
                split,
                str(st["stories"]),
                str(st["items"]),
                span,
                "-" if mw is None else f"{mw:.1f}",
                str(st["empty_sentences"]),
                str(st["images"]),
                str(len(st["images_missing"])),
                str(len(st["images_unreadable"])),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt_row(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [f"{stats['data']} ({stats['format']})", fmt_row(head), fmt_row(tuple("-" * w for w in widths))]
    lines += [fmt_row(r) for r in rows]
    lines += absent
    for split, st in stats["splits"].items():
        if st.get("present") and len(st["lengths"]) > 1:
            hist = ", ".join(f"{n}: {c}" for n, c in st["lengths"].items())
            lines.append(f"{split} lengths: {hist}")
    for split, st in stats["splits"].items():
        if not st.get("present"):
            continue
        for label, entries in (("missing", st["images_missing"]), ("unreadable", st["images_unreadable"])):
            for e in entries[:_SHOW]:
                lines.append(f"  {split} {label}: {e if isinstance(e, str) else e[0] + ': ' + e[1]}")
            if len(entries) > _SHOW:
                lines.append(f"  {split} {label}: ... and {len(entries) - _SHOW} more")
    probs = stats.get("problems") or []
    lines.append("problems: none" if not probs else "problems:")
    lines += [f"  - {p}" for p in probs]
    return "\n".join(lines)
